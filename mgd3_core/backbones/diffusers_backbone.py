"""A ``Backbone`` made of diffusers models: ``DiTTransformer2DModel`` + ``AutoencoderKL``.

One loader serves both kinds of backbone:

- ``pretrained``: ``backbone.transformer_dir`` and ``backbone.vae_dir`` point at
  local diffusers-layout directories (e.g. copies of ``facebook/DiT-XL-2-256``
  and ``stabilityai/sd-vae-ft-mse``);
- ``embedded``: the pipeline trains a small VAE + DiT (``embedded.py``) and saves
  them as a pipeline root (``vae/``, ``transformer/``, ``scheduler/``) under the
  storage root; it is then loaded exactly like a pretrained DiT.

The training noise schedule comes from ``scheduler/scheduler_config.json`` next
to the transformer (a pipeline root, or the transformer folder's sibling); when
there is none, DiT's own schedule (linear betas 1e-4 .. 0.02, 1000 steps) is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from torch import nn

from .diffusers_files import (
    SCHEDULER_CONFIG_NAME,
    BackboneFilesError,
    BackboneMismatchError,
    check_class_name,
    component_fingerprint,
    load_pretrained,
    read_json,
    resolve_component_dir,
    weight_files,
)
from .schedule import DIT_DEFAULT_SCHEDULE, betas_from_scheduler_config
from .vae import find_vae_dir, load_vae, vae_downsampling_factor, vae_sample_size

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Older diffusers releases saved DiT as the generic Transformer2DModel (norm_type
# "ada_norm_zero"); its weights use the same names as DiTTransformer2DModel's.
TRANSFORMER_CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")


def find_scheduler_config(transformer_path: Path, transformer_dir: Path) -> Path | None:
    """``scheduler/scheduler_config.json`` of the pipeline the transformer belongs to."""
    for root in (transformer_path, transformer_dir.parent):
        candidate = root / "scheduler" / SCHEDULER_CONFIG_NAME
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------------------- the backbone
def _on(model: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    """Inference copy on ``device``; cast only when needed (the loaders already
    load in ``dtype``, which keeps diffusers' float32-only modules intact)."""
    model = model.to(device)
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


class DiffusersBackbone:
    """A class-conditional latent diffusion backbone (implements ``Backbone``).

    transformer: ``DiTTransformer2DModel``; ``out_channels == 2 * in_channels``
    means learned variance (DiT-XL/2), ``== in_channels`` a fixed-variance model.
    Class labels are 0 .. ``num_embeds_ada_norm``-1; the extra embedding row
    ``num_classes`` is the null label for classifier-free guidance.
    vae: ``AutoencoderKL``; latents are its posterior mean times
    ``scaling_factor`` (after subtracting ``shift_factor`` when it has one).
    betas: (T,) the training noise schedule.

    Tensors: images (B, C_img, H, W) in [-1, 1]; latents (B, C_lat, h, w).
    Outputs are float32; the models run in ``dtype`` on ``device``.
    """

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        vae: AutoencoderKL,
        betas: torch.Tensor,
        *,
        fingerprint: str,
        vae_fingerprint: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        source: dict | None = None,
        autocast: torch.dtype | None = None,
    ):
        tcfg, vcfg = transformer.config, vae.config
        c_lat = int(tcfg.in_channels)
        out = int(tcfg.out_channels or c_lat)
        if out not in (c_lat, 2 * c_lat):
            raise BackboneMismatchError(
                f"transformer out_channels = {out} must equal in_channels ({c_lat}, fixed variance) "
                f"or twice it ({2 * c_lat}, learned variance)"
            )
        if int(vcfg.latent_channels) != c_lat:
            raise BackboneMismatchError(
                f"transformer in_channels = {c_lat} but the VAE has latent_channels = {vcfg.latent_channels}"
            )
        table = transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        self.num_classes = int(tcfg.num_embeds_ada_norm)
        if table.num_embeddings != self.num_classes + 1:
            raise BackboneMismatchError(
                f"transformer has {table.num_embeddings} label embeddings for {self.num_classes} classes; "
                "expected one extra row for the null class"
            )
        self.transformer = _on(transformer, device, dtype)
        self.vae = _on(vae, device, dtype)
        self.null_class = self.num_classes
        self.learned_variance = out == 2 * c_lat
        self.scaling_factor = float(vcfg.scaling_factor)
        self.shift_factor = float(vcfg.shift_factor or 0.0)
        self.latent_shape = (c_lat, int(tcfg.sample_size), int(tcfg.sample_size))
        self.image_size = int(tcfg.sample_size) * vae_downsampling_factor(vcfg)
        self.image_channels = int(vcfg.in_channels)
        self.device = torch.device(device)
        self.dtype = dtype
        self.fingerprint = fingerprint
        self.vae_fingerprint = vae_fingerprint
        self.source = dict(source or {})
        # Mixed precision (e.g. bf16 on a GPU): the models run under torch.autocast with this
        # dtype while their weights and the sampler's state stay in ``dtype``.
        self.autocast = autocast
        self._betas = betas.detach().to(torch.float64).cpu().clone()

    def __repr__(self) -> str:
        return (
            f"DiffusersBackbone(fingerprint={self.fingerprint!r}, classes={self.num_classes}, "
            f"latent_shape={self.latent_shape}, image_size={self.image_size}, "
            f"learned_variance={self.learned_variance}, device={self.device}, dtype={self.dtype})"
        )

    def train_betas(self) -> torch.Tensor:
        """(T,) float64 betas of the training noise schedule (a copy)."""
        return self._betas.clone()

    def _amp(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _check(self, x: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"{name} must have shape (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C_img, H, W) in [-1, 1] -> posterior mean x scaling factor (B, C_lat, h, w) float32."""
        self._check(images, (self.image_channels, self.image_size, self.image_size), "images")
        x = images.to(device=self.device, dtype=self.dtype)
        with self._amp():
            mean = self.vae.encode(x).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C_lat, h, w) -> (B, C_img, H, W) float32 in [-1, 1] (clamped)."""
        self._check(latents, self.latent_shape, "latents")
        z = latents.to(device=self.device, dtype=self.dtype) / self.scaling_factor + self.shift_factor
        with self._amp():
            return self.vae.decode(z).sample.clamp(-1.0, 1.0).float()

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Noise prediction. x_t (B, C_lat, h, w); t (B,) or scalar training-step index;
        labels (B,) in 0 .. num_classes (``null_class`` = unconditional).
        Returns (B, C_lat, h, w), or (B, 2*C_lat, h, w) with learned variance; float32."""
        self._check(x_t, self.latent_shape, "x_t")
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=self.device).long()
        if t.ndim == 0:
            t = t.expand(b)
        labels = torch.as_tensor(labels)
        if t.shape != (b,) or labels.shape != (b,):
            raise ValueError(f"t and labels must have shape ({b},), got {tuple(t.shape)} and {tuple(labels.shape)}")
        # Range-checked where it costs nothing: on the CPU. Labels already on an accelerator come
        # from ``sampling.sample``, which checks them on the CPU once per request; reading them back
        # here would stall the device queue on every step.
        if b and labels.device.type == "cpu" and (int(labels.min()) < 0 or int(labels.max()) > self.null_class):
            raise ValueError(
                f"class labels must be in [0, {self.num_classes}] ({self.num_classes} = null class), "
                f"got [{int(labels.min())}, {int(labels.max())}]"
            )
        labels = labels.to(self.device).long()
        with self._amp():
            out = self.transformer(
                x_t.to(device=self.device, dtype=self.dtype), timestep=t, class_labels=labels
            ).sample
        return out.float()


# --------------------------------------------------------------------------- loading
def find_transformer_dir(path: str | os.PathLike, what: str = "backbone.transformer_dir") -> Path:
    """The ``DiTTransformer2DModel`` folder under ``path`` (pipeline root or the folder itself)."""
    tdir = resolve_component_dir(path, "transformer", what)
    cfg_path = tdir / "config.json"
    config = read_json(cfg_path)
    check_class_name(config, cfg_path, TRANSFORMER_CLASS_NAMES)
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or not config.get("num_embeds_ada_norm"):
        raise BackboneFilesError(
            f"{cfg_path}: not a class-conditional DiT (needs norm_type 'ada_norm_zero' and "
            "num_embeds_ada_norm = the number of classes)"
        )
    weight_files(tdir)
    return tdir


def runtime_identity(device: str | torch.device, dtype: torch.dtype) -> dict:
    """The settings besides the weights that change a backbone's outputs: the dtype it runs
    in and the kind of device (CPU and CUDA kernels round differently; the index of a
    GPU does not matter). Empty for float32 on the CPU, which keeps the fingerprints of
    backbones made before these settings were part of them."""
    kind = torch.device(device).type
    name = str(dtype).removeprefix("torch.")
    return {} if (kind, name) == ("cpu", "float32") else {"device": kind, "dtype": name}


class _Resolved:
    """The files of one backbone, checked for compatibility without loading weights."""

    def __init__(self, transformer_path, vae_path, what_t="backbone.transformer_dir", what_v="backbone.vae_dir",
                 cache_dir: Path | None = None):
        self.cache_dir = cache_dir
        self.transformer_path = Path(transformer_path).expanduser()
        self.transformer_dir = find_transformer_dir(self.transformer_path, what_t)
        self.vae_dir = find_vae_dir(vae_path, what_v)
        tcfg = read_json(self.transformer_dir / "config.json")
        vcfg = read_json(self.vae_dir / "config.json")
        t_in = int(tcfg.get("in_channels", 4))
        v_lat = int(vcfg.get("latent_channels", 4))
        if t_in != v_lat:
            raise BackboneMismatchError(
                f"{self.transformer_dir / 'config.json'}: in_channels = {t_in} does not match "
                f"latent_channels = {v_lat} of the VAE in {self.vae_dir / 'config.json'}; "
                "use the VAE the transformer was trained with"
            )
        factor = vae_downsampling_factor(vcfg)
        self.image_size = int(tcfg.get("sample_size", 32)) * factor
        v_size = vae_sample_size(vcfg)
        if self.image_size != v_size:
            raise BackboneMismatchError(
                f"{self.transformer_dir / 'config.json'}: sample_size = {tcfg.get('sample_size')} latent "
                f"cells x VAE factor {factor} = {self.image_size} px, but the VAE in "
                f"{self.vae_dir / 'config.json'} has sample_size = {v_size} px; use a transformer and a VAE "
                "made for the same image size"
            )
        self.image_channels = int(vcfg.get("in_channels", 3))
        sched = find_scheduler_config(self.transformer_path, self.transformer_dir)
        self.scheduler_config_path = sched
        if sched is None:
            log.info("%s: no scheduler/%s found; using DiT's linear schedule", self.transformer_path,
                     SCHEDULER_CONFIG_NAME)
            self.betas = betas_from_scheduler_config(DIT_DEFAULT_SCHEDULE, "DiT's default schedule")
        else:
            self.betas = betas_from_scheduler_config(read_json(sched), str(sched))

    def fingerprints(self, runtime: dict | None = None) -> tuple[str, str]:
        """(backbone fingerprint, VAE fingerprint): hashes of configs + weight files + betas,
        and of ``runtime`` (:func:`runtime_identity`): the same weights run in bfloat16 or on a
        GPU give other latents and images, so they get other fingerprints (and latent stores)."""
        vae_fp = component_fingerprint(self.vae_dir, self.cache_dir)
        if runtime:
            vae_fp = hashlib.sha256(json.dumps([vae_fp, runtime], sort_keys=True).encode()).hexdigest()[:16]
        parts = {
            "transformer": component_fingerprint(self.transformer_dir, self.cache_dir),
            "vae": vae_fp,
            # The betas, not the scheduler file: settings that do not change the
            # training schedule (clip_sample, ...) do not change the backbone.
            "betas": hashlib.sha256(self.betas.numpy().astype(np.float64).tobytes()).hexdigest(),
        }
        if runtime:
            parts["runtime"] = runtime
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16], vae_fp


def load_diffusers_backbone(
    transformer_path: str | os.PathLike,
    vae_path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
) -> DiffusersBackbone:
    """Load a DiT + VAE backbone from local diffusers-layout directories.

    Local files and safetensors only. Raises BackboneFilesError (missing
    directory or files) or BackboneMismatchError (in_channels / sample_size not
    matching the VAE), naming the paths and values. ``cache_dir`` keeps the
    weight hashes between processes (:func:`mgd3_core.storage.fingerprint_cache_dir`).
    """
    r = _Resolved(transformer_path, vae_path, cache_dir=cache_dir)
    fingerprint, vae_fp = r.fingerprints(runtime_identity(device, dtype))
    transformer = load_pretrained(DiTTransformer2DModel, r.transformer_dir, dtype)
    vae, _ = load_vae(r.vae_dir, device=device, dtype=dtype, cache_dir=cache_dir)
    return DiffusersBackbone(
        transformer, vae, r.betas, fingerprint=fingerprint, vae_fingerprint=vae_fp, device=device, dtype=dtype,
        source={
            "transformer_dir": str(r.transformer_dir),
            "vae_dir": str(r.vae_dir),
            "scheduler_config": str(r.scheduler_config_path) if r.scheduler_config_path else None,
        },
    )


def diffusers_fingerprints(transformer_path: str | os.PathLike, vae_path: str | os.PathLike, *,
                           device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                           cache_dir: Path | None = None) -> tuple[str, str]:
    """(backbone fingerprint, VAE fingerprint) that ``load_diffusers_backbone`` would give, without
    loading any weights: configs and weight files are hashed once and then recognised by their path,
    size, mtime and inode (in this process, and under ``cache_dir`` across processes;
    :func:`.diffusers_files.files_fingerprint`), the betas, and the dtype and device kind they run
    in (:func:`runtime_identity`)."""
    return _Resolved(transformer_path, vae_path, cache_dir=cache_dir).fingerprints(runtime_identity(device, dtype))
