"""Backbones: the ``Backbone`` interface, one module per ``backbone.kind``, and the registry.

- :func:`load_backbone` / :func:`backbone_fingerprint` / :func:`ensure_backbone`:
  the configured backbone, its cheap fingerprint for change detection, and
  training it when the pipeline trains it (``registry.py``).
- kinds: ``embedded.py`` (trained here), ``pretrained_dit.py`` (local DiT + VAE),
  ``stable_diffusion.py`` (a local SD-1.x pipeline, its files checked in ``sd_files.py``).
- shared: ``base.py`` (interface), ``diffusers_backbone.py`` (DiT + VAE loaded with
  diffusers), ``diffusers_files.py`` (the diffusers folder layout), ``schedule.py``
  (noise schedules), ``vae.py``, ``train_loop.py``.
"""

from .base import Backbone, hash_files
from .diffusers_backbone import DiffusersBackbone, load_diffusers_backbone
from .diffusers_files import BackboneFilesError, BackboneMismatchError
from .embedded import embedded_backbone_dir, ensure_embedded_backbone
from .embedded_training import build_dit, build_vae
from .registry import (backbone_class_conditions, backbone_fingerprint, backbone_vae_fingerprint, ensure_backbone,
                       load_backbone)
from .schedule import betas_from_scheduler_config
from .vae import load_vae, vae_fingerprint

__all__ = [
    "Backbone",
    "BackboneFilesError",
    "BackboneMismatchError",
    "DiffusersBackbone",
    "backbone_class_conditions",
    "backbone_fingerprint",
    "backbone_vae_fingerprint",
    "betas_from_scheduler_config",
    "build_dit",
    "build_vae",
    "embedded_backbone_dir",
    "ensure_backbone",
    "ensure_embedded_backbone",
    "hash_files",
    "load_backbone",
    "load_diffusers_backbone",
    "load_vae",
    "vae_fingerprint",
]
