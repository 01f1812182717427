"""The files of a Stable Diffusion 1.x pipeline root (diffusers layout), checked against each
other without loading any weights, and their fingerprints (``stable_diffusion.py`` loads them)::

    unet/          UNet2DConditionModel   config.json + diffusion_pytorch_model.safetensors
    text_encoder/  CLIPTextModel          config.json + model.safetensors
    tokenizer/     CLIPTokenizer          vocab.json + merges.txt (+ tokenizer_config.json ...)
    vae/           AutoencoderKL          config.json + diffusion_pytorch_model.safetensors
    scheduler/     scheduler_config.json  betas and prediction type
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .diffusers_files import (SCHEDULER_CONFIG_NAME, BackboneFilesError, BackboneMismatchError, check_class_name,
                              component_fingerprint, files_fingerprint, read_json, resolve_component_dir,
                              weight_files)
from .schedule import betas_from_scheduler_config
from .vae import find_vae_dir, vae_downsampling_factor

PREDICTION_TYPES = ("epsilon", "v_prediction")
TEXT_WEIGHTS_NAME = "model.safetensors"
TEXT_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
WHAT = "backbone.stable_diffusion.pipeline_dir"


def _tokenizer_files(tok_dir: Path) -> list[Path]:
    """Every file of the tokenizer folder (vocabulary, merges, settings): all shape the prompt."""
    if not tok_dir.is_dir():
        raise BackboneFilesError(f"{tok_dir}: tokenizer folder missing; expected {list(TOKENIZER_FILES)}")
    missing = [n for n in TOKENIZER_FILES if not (tok_dir / n).is_file()]
    if missing:
        raise BackboneFilesError(f"{tok_dir}: missing {missing}; a CLIP tokenizer needs {list(TOKENIZER_FILES)}")
    return sorted(p for p in tok_dir.iterdir() if p.is_file() and not p.name.startswith("."))


class StableDiffusionFiles:
    """The components of one SD-1.x pipeline root, checked against each other without
    loading any weights (names the file and the values on a mismatch)."""

    def __init__(self, root: str | os.PathLike, generation_size: int):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise BackboneFilesError(
                f"{WHAT} = {self.root}: directory does not exist; point it at a local copy of an SD-1.x "
                "pipeline in the diffusers layout (unet/, text_encoder/, tokenizer/, vae/, scheduler/)"
            )
        missing = [c for c in ("unet", "text_encoder", "tokenizer", "vae", "scheduler") if not (self.root / c).is_dir()]
        if missing:
            raise BackboneFilesError(f"{WHAT} = {self.root}: missing component folder(s) {missing}")
        self.unet_dir = resolve_component_dir(self.root / "unet", "unet", f"{WHAT}/unet")
        self.unet_config = read_json(self.unet_dir / "config.json")
        check_class_name(self.unet_config, self.unet_dir / "config.json", ("UNet2DConditionModel",))
        weight_files(self.unet_dir)
        self.text_dir = resolve_component_dir(self.root / "text_encoder", "text_encoder", f"{WHAT}/text_encoder")
        self.text_config = read_json(self.text_dir / "config.json")
        archs = self.text_config.get("architectures") or ["CLIPTextModel"]
        if "CLIPTextModel" not in archs:
            raise BackboneFilesError(
                f"{self.text_dir / 'config.json'}: architectures {archs}, expected CLIPTextModel (SD 1.x)"
            )
        self.text_files = [self.text_dir / "config.json"] + weight_files(
            self.text_dir, TEXT_WEIGHTS_NAME, TEXT_WEIGHTS_INDEX_NAME)
        self.tokenizer_dir = (self.root / "tokenizer").resolve()
        self.tokenizer_files = _tokenizer_files(self.tokenizer_dir)
        self.vae_dir = find_vae_dir(self.root / "vae", f"{WHAT}/vae")
        self.vae_config = read_json(self.vae_dir / "config.json")
        self.scheduler_path = self.root / "scheduler" / SCHEDULER_CONFIG_NAME
        self.scheduler_config = read_json(self.scheduler_path)
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise BackboneMismatchError(
                f"{self.scheduler_path}: prediction_type {self.prediction_type!r}; supported: {list(PREDICTION_TYPES)}"
            )
        # The betas alone: the prediction type is handled here (eps or v), not by that helper.
        self.betas = betas_from_scheduler_config(
            {**self.scheduler_config, "prediction_type": "epsilon"}, str(self.scheduler_path)
        )
        self.generation_size = int(generation_size)
        self._check_shapes()

    def _check_shapes(self) -> None:
        u, t, v = self.unet_config, self.text_config, self.vae_config
        ucfg, tcfg, vcfg = (d / "config.json" for d in (self.unet_dir, self.text_dir, self.vae_dir))
        c_in, c_out = int(u.get("in_channels", 4)), int(u.get("out_channels", 4))
        if c_in != int(v.get("latent_channels", 4)):
            raise BackboneMismatchError(
                f"{ucfg}: in_channels = {c_in} does not match latent_channels = {v.get('latent_channels')} of "
                f"{vcfg}; use the VAE the UNet was trained with"
            )
        if c_out != c_in:
            raise BackboneMismatchError(
                f"{ucfg}: out_channels = {c_out} != in_channels = {c_in}; the sampler needs a fixed-variance "
                "epsilon or v model (an inpainting UNet does not fit)"
            )
        cross = u.get("cross_attention_dim")
        hidden = int(t.get("hidden_size", -1))
        if isinstance(cross, (list, tuple)) or int(cross or -1) != hidden:
            raise BackboneMismatchError(
                f"{ucfg}: cross_attention_dim = {cross} does not match hidden_size = {hidden} of the text "
                f"encoder in {tcfg}; use the text encoder the UNet was trained with"
            )
        factor = vae_downsampling_factor(v)
        # The UNet halves the latent once per down block after the first.
        unet_factor = 2 ** (len(u.get("down_block_types", [])) - 1)
        if self.generation_size % (factor * unet_factor):
            raise BackboneMismatchError(
                f"backbone.stable_diffusion.generation_size = {self.generation_size} px is not divisible by "
                f"{factor * unet_factor} (VAE factor {factor} in {vcfg} x UNet factor {unet_factor} in {ucfg})"
            )
        self.latent_shape = (c_in, self.generation_size // factor, self.generation_size // factor)

    def fingerprints(self, runtime: dict | None = None) -> tuple[str, str]:
        """(backbone fingerprint, VAE fingerprint). The backbone's covers the UNet, the text
        encoder, every tokenizer file, the VAE, the scheduler config and the generation size;
        the VAE's (which keys latent stores) the VAE and the generation size it encodes at.
        Both cover ``runtime`` (``diffusers_backbone.runtime_identity``: the dtype and device
        kind, empty for float32 on the CPU): the same files in float16 on a GPU give other
        latents and images, so they get other fingerprints and latent stores."""
        vae_fp = component_fingerprint(self.vae_dir)
        parts = {
            "unet": component_fingerprint(self.unet_dir),
            "text_encoder": files_fingerprint(self.text_files),
            "tokenizer": files_fingerprint(self.tokenizer_files),
            "vae": vae_fp,
            "scheduler": files_fingerprint([self.scheduler_path]),
            "generation_size": self.generation_size,
        }
        latent_space = {"vae": vae_fp, "generation_size": self.generation_size}
        if runtime:
            parts["runtime"] = latent_space["runtime"] = runtime
        return _short_hash(parts), _short_hash(latent_space)


def _short_hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
