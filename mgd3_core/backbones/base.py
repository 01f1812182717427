"""The ``Backbone`` interface: everything the sampler and the latent store need.

A backbone bundles a VAE (images <-> latents) and a class-conditional denoiser
(epsilon prediction, optionally with learned-variance channels) with the noise
schedule it was trained on. Tensors:

- images: (B, C_img, H, W) float in [-1, 1]
- latents: (B, C_lat, h, w) float, already multiplied by ``scaling_factor``
- timesteps: (B,) long, indices into the *training* schedule (0 .. T-1)
- denoiser output: (B, C_lat, h, w), or (B, 2*C_lat, h, w) when
  ``learned_variance`` (noise channels first, variance interpolation second)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ..config import BackboneConfig, ExperimentConfig


@runtime_checkable
class Backbone(Protocol):
    fingerprint: str  # stable hash of configs + weights (lineage, change detection)
    vae_fingerprint: str  # hash of the VAE alone (latent stores depend only on it)
    num_classes: int  # conditional labels are 0 .. num_classes-1
    null_class: int  # label used for the unconditional half of CFG
    learned_variance: bool
    scaling_factor: float
    latent_shape: tuple[int, int, int]  # (C_lat, h, w)
    image_size: int
    image_channels: int
    device: torch.device
    dtype: torch.dtype

    def train_betas(self) -> torch.Tensor:
        """(T,) float64 betas of the training noise schedule."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior mean x scaling factor. (B, C_img, H, W) -> (B, C_lat, h, w)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C_lat, h, w) -> (B, C_img, H, W) in [-1, 1] (clamped)."""

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One denoiser call; labels may contain ``null_class``."""


def hash_files(paths: list[Path], extra: dict | None = None) -> str:
    """sha256 over file names and bytes (sorted by name) plus a JSON-able dict."""
    h = hashlib.sha256()
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def configs_of(cfg: ExperimentConfig | BackboneConfig) -> tuple[BackboneConfig, ExperimentConfig | None]:
    """(backbone config, experiment config or None) of what a caller passed."""
    if isinstance(cfg, ExperimentConfig):
        return cfg.backbone, cfg
    if isinstance(cfg, BackboneConfig):
        return cfg, None
    raise TypeError(f"expected an ExperimentConfig or BackboneConfig, got {type(cfg).__name__}")


def experiment_of(cfg: ExperimentConfig | BackboneConfig, why: str) -> ExperimentConfig:
    """The experiment config, for a backbone kind that needs more than ``cfg.backbone``."""
    _, exp = configs_of(cfg)
    if exp is None:
        raise TypeError(
            f"{why}: pass the ExperimentConfig (not cfg.backbone) to load_backbone / backbone_fingerprint"
        )
    return exp
