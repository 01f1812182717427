"""Loading a VAE (diffusers ``AutoencoderKL``) from a local directory.

Used for a pretrained VAE (e.g. a copy of ``stabilityai/sd-vae-ft-mse``) and for
the embedded VAE the pipeline trains itself; both go through :func:`load_vae`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .diffusers_files import (
    BackboneMismatchError,
    check_class_name,
    component_fingerprint,
    load_pretrained,
    read_json,
    resolve_component_dir,
    weight_files,
)


def vae_downsampling_factor(vae_config) -> int:
    """Pixels per latent cell along one side: 2 per down block after the first."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def vae_sample_size(vae_config) -> int:
    """The nominal image side of a VAE config (``sample_size`` may be int or [h, w])."""
    size = vae_config.get("sample_size", 32)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise BackboneMismatchError(f"non-square VAE sample_size {list(size)} is not supported")
        size = size[0]
    return int(size)


def find_vae_dir(path: str | os.PathLike, what: str = "backbone.vae_dir") -> Path:
    """The ``AutoencoderKL`` folder under ``path`` (a pipeline root or the folder itself)."""
    vae_dir = resolve_component_dir(path, "vae", what)
    check_class_name(read_json(vae_dir / "config.json"), vae_dir / "config.json", ("AutoencoderKL",))
    weight_files(vae_dir)  # fail early, naming the folder, when the weights are missing
    return vae_dir


def vae_fingerprint(path: str | os.PathLike, what: str = "backbone.vae_dir") -> str:
    """Hash of the VAE's config and weights, without loading it."""
    return component_fingerprint(find_vae_dir(path, what))


def load_vae(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    what: str = "backbone.vae_dir",
    cache_dir: Path | None = None,
) -> tuple[AutoencoderKL, str]:
    """Load an ``AutoencoderKL`` from a local diffusers-layout directory.

    Local files only, safetensors only (never unpickles). Returns the model in
    eval mode with gradients off, and its fingerprint (hash of ``config.json``
    and the weight files: every place its latents go records it).
    Raises BackboneFilesError naming the directory when it or its files are
    missing.
    """
    vae_dir = find_vae_dir(path, what)
    fingerprint = component_fingerprint(vae_dir, cache_dir)
    vae = load_pretrained(AutoencoderKL, vae_dir, dtype)
    vae.to(device).eval().requires_grad_(False)
    return vae, fingerprint
