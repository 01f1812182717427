"""``backbone.kind: pretrained``: a class-conditional DiT and its VAE from local
directories in the diffusers layout (e.g. copies of ``facebook/DiT-XL-2-256`` and
``stabilityai/sd-vae-ft-mse``), loaded by ``diffusers_backbone``.

Nothing is trained: the ``backbone`` asset observes the files and their fingerprint.
"""

from __future__ import annotations

from pathlib import Path

from ..config import BackboneConfig, ExperimentConfig
from .base import Backbone, configs_of
from ..storage import fingerprint_cache_dir
from .diffusers_backbone import DTYPES, diffusers_fingerprints, load_diffusers_backbone

TRAINED_BY_PIPELINE = False


def _paths(cfg: ExperimentConfig | BackboneConfig) -> tuple[Path, Path]:
    bcfg, _ = configs_of(cfg)
    return Path(bcfg.transformer_dir), Path(bcfg.vae_dir)


def ensure(cfg: ExperimentConfig, home: Path, progress=None) -> None:
    """Nothing to train: loading (``load``) is what checks the files."""


def load(cfg: ExperimentConfig | BackboneConfig, home: Path) -> Backbone:
    bcfg, _ = configs_of(cfg)
    return load_diffusers_backbone(*_paths(cfg), device=bcfg.device, dtype=DTYPES[bcfg.dtype],
                                   cache_dir=fingerprint_cache_dir(home))


def _fingerprints(cfg: ExperimentConfig | BackboneConfig, home: Path) -> tuple[str, str]:
    bcfg, _ = configs_of(cfg)
    return diffusers_fingerprints(*_paths(cfg), device=bcfg.device, dtype=DTYPES[bcfg.dtype],
                                  cache_dir=fingerprint_cache_dir(home))


def fingerprint(cfg: ExperimentConfig | BackboneConfig, home: Path) -> str | None:
    return _fingerprints(cfg, home)[0]


def vae_fingerprint(cfg: ExperimentConfig | BackboneConfig, home: Path) -> str | None:
    return _fingerprints(cfg, home)[1]


def class_conditions(cfg: ExperimentConfig) -> dict[str, str]:
    """Empty: a class-conditional DiT sees a class's label only, never its name."""
    return {}


def version_inputs(cfg: ExperimentConfig) -> dict:
    """An observed backbone has no code version: its data version is its fingerprint."""
    return {}


def describe(cfg: ExperimentConfig) -> str:
    return f"Pretrained backbone: DiT {cfg.backbone.transformer_dir}, VAE {cfg.backbone.vae_dir}."
