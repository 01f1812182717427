"""The backbone registry: one module per ``backbone.kind``.

A kind module provides:

- ``TRAINED_BY_PIPELINE``: True when the ``backbone`` asset trains it (a
  materialized asset), False when it exists outside the pipeline (an observed
  source asset whose data version is its fingerprint);
- ``ensure(cfg, home, progress=None)``: make it available (train it, or nothing);
- ``load(cfg, home) -> Backbone`` (``base.Backbone``);
- ``fingerprint(cfg, home) -> str | None``: without loading weights; None when
  a backbone the pipeline trains has not been trained yet;
- ``vae_fingerprint(cfg, home) -> str | None``: the fingerprint latent stores are
  kept under, without loading weights (steps that need only it never load a model);
- ``version_inputs(cfg) -> dict``: what the trained backbone depends on (the
  ``backbone`` asset's code version);
- ``class_conditions(cfg) -> dict[str, str]``: {class id: the text a class's images
  are generated from} for a text-conditioned backbone (a class's prompt), ``{}`` for
  one conditioned on class labels only;
- ``describe(cfg) -> str``: one line for the UI.

Adding a kind: write ``mgd3_core/backbones/<kind>.py`` with those names, add one
line to ``KINDS`` below, and add the kind's name and its config model to
``BackboneConfig`` in ``mgd3_core/config.py``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ..config import BACKBONE_KINDS, BackboneConfig, ExperimentConfig
from . import embedded, pretrained_dit, stable_diffusion
from .base import Backbone, configs_of
from .diffusers_files import BackboneMismatchError

KINDS: dict[str, ModuleType] = {
    "embedded": embedded,
    "pretrained": pretrained_dit,
    "stable_diffusion": stable_diffusion,
}
assert set(KINDS) == set(BACKBONE_KINDS), "config.BACKBONE_KINDS and backbones.registry.KINDS disagree"


def backbone_kind(cfg: ExperimentConfig | BackboneConfig) -> ModuleType:
    """The module that implements the configured ``backbone.kind``."""
    bcfg, _ = configs_of(cfg)
    return KINDS[bcfg.kind]


def load_backbone(cfg: ExperimentConfig | BackboneConfig, home: Path) -> Backbone:
    """The configured backbone, on ``backbone.device`` in ``backbone.dtype``.

    ``pretrained``: loads ``backbone.transformer_dir`` + ``backbone.vae_dir``.
    ``embedded``: loads the trained embedded backbone of this experiment from
    ``home/backbones/`` (pass the ExperimentConfig; train it first with
    ``ensure_backbone``). With an ExperimentConfig, the dataset's image size and
    channels must match the backbone's.
    """
    _, exp = configs_of(cfg)
    backbone = backbone_kind(cfg).load(cfg, Path(home))
    if exp is not None and (
        exp.dataset.image_size != backbone.image_size or exp.dataset.channels != backbone.image_channels
    ):
        where = getattr(backbone, "source", {}).get("transformer_dir") or f"backbone.kind {exp.backbone.kind!r}"
        raise BackboneMismatchError(
            f"dataset.image_size = {exp.dataset.image_size}, dataset.channels = {exp.dataset.channels} but the "
            f"backbone in {where} works on {backbone.image_size} px images with "
            f"{backbone.image_channels} channels; set the dataset to match the backbone"
        )
    return backbone


def backbone_fingerprint(cfg: ExperimentConfig | BackboneConfig, home: Path) -> str | None:
    """The fingerprint ``load_backbone`` would give, without loading any weights.

    None when the embedded backbone has not been trained yet. Raises like
    ``load_backbone`` for missing or mismatched pretrained files.
    """
    return backbone_kind(cfg).fingerprint(cfg, Path(home))


def backbone_vae_fingerprint(cfg: ExperimentConfig | BackboneConfig, home: Path) -> str | None:
    """The fingerprint of the configured backbone's VAE as it runs (weights, dtype, device kind),
    without loading any weights; None when the embedded backbone has not been trained yet."""
    return backbone_kind(cfg).vae_fingerprint(cfg, Path(home))


def ensure_backbone(cfg: ExperimentConfig, home: Path, progress=None) -> None:
    """Train (or reuse) a backbone the pipeline trains; nothing for one it does not."""
    backbone_kind(cfg).ensure(cfg, Path(home), progress=progress)


def backbone_class_conditions(cfg: ExperimentConfig) -> dict[str, str]:
    """{class id: the text its images are generated from}; empty for a label-conditioned backbone."""
    return backbone_kind(cfg).class_conditions(cfg)
