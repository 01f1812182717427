"""Backbones: the ``Backbone`` interface and its diffusers implementation.

- :func:`load_backbone` / :func:`backbone_fingerprint`: the configured backbone
  (a pretrained DiT + VAE from local directories, or the embedded one) and its
  cheap fingerprint for change detection.
- :func:`ensure_embedded_backbone`: train (or reuse) the embedded backbone.
- :func:`load_vae`: a VAE alone, with its fingerprint.
"""

from .base import Backbone, hash_files
from .diffusers_backbone import (
    DiffusersBackbone,
    backbone_fingerprint,
    betas_from_scheduler_config,
    load_backbone,
    load_diffusers_backbone,
)
from .embedded import build_dit, build_vae, embedded_backbone_dir, ensure_embedded_backbone
from .layout import BackboneFilesError, BackboneMismatchError
from .vae import load_vae, vae_fingerprint

__all__ = [
    "Backbone",
    "BackboneFilesError",
    "BackboneMismatchError",
    "DiffusersBackbone",
    "backbone_fingerprint",
    "betas_from_scheduler_config",
    "build_dit",
    "build_vae",
    "embedded_backbone_dir",
    "ensure_embedded_backbone",
    "hash_files",
    "load_backbone",
    "load_diffusers_backbone",
    "load_vae",
    "vae_fingerprint",
]
