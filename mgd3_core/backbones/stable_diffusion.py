"""A text-to-image ``Backbone``: Stable Diffusion 1.x, conditioned on class prompts.

``backbone.kind: stable_diffusion`` loads a local diffusers-layout pipeline root
(a copy of ``stable-diffusion-v1-5``), local files and safetensors only::

    unet/          UNet2DConditionModel   config.json + diffusion_pytorch_model.safetensors
    text_encoder/  CLIPTextModel          config.json + model.safetensors
    tokenizer/     CLIPTokenizer          vocab.json + merges.txt (+ tokenizer_config.json ...)
    vae/           AutoencoderKL          config.json + diffusion_pytorch_model.safetensors
    scheduler/     scheduler_config.json  betas and prediction type

A class label selects its prompt (``prompt_template`` with the class's readable
name), the CFG null label the negative prompt; each prompt is encoded once and
cached, so the sampler's loop (``sampling.sample``) runs unchanged. A
``v_prediction`` output is turned into the noise it implies (Salimans & Ho 2022).
Images are generated at ``generation_size`` px; ``encode`` resizes the dataset's
images to that size first (modes and samples share one latent space) and
``decode`` resizes back to ``dataset.image_size``. Sampling step t runs the UNet
at timestep round(t (T-1) / (S-1)): t_stop 25 of 50 stops guidance at timestep
510 (``stop_step_for_timestep`` converts scheduler units to t_stop).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from .base import experiment_of
from .diffusers_backbone import DTYPES, _on, runtime_identity
from .diffusers_files import BackboneFilesError, BackboneMismatchError, load_pretrained
from .sd_files import WHAT, StableDiffusionFiles
from .vae import load_vae


def stop_step_for_timestep(timestep: int, steps: int, num_train_timesteps: int = 1000) -> int:
    """``t_stop`` (in sampling steps, of ``steps``) that guides exactly the steps whose UNet
    timestep round(t (T-1) / (S-1)) is above ``timestep`` (scheduler units, 0 .. T-1).
    E.g. (500, 50) -> 24: guidance on timesteps 999 ... 510, none from 489 on."""
    if steps < 2:
        return 0
    stride = (num_train_timesteps - 1) / (steps - 1)
    return max(t for t in range(steps) if round(t * stride) <= timestep) if timestep >= 0 else 0


# --------------------------------------------------------------------------- the backbone
class StableDiffusionBackbone:
    """Text-conditioned latent diffusion (implements ``Backbone``).

    class_prompts: {backbone class label: prompt}; labels run 0 .. ``num_classes``-1
    (``num_classes`` = largest label + 1) and ``null_class`` = ``num_classes``
    stands for the negative prompt. Tensors: images (B, 3, image_size, image_size)
    in [-1, 1]; latents (B, 4, generation_size/8, generation_size/8) for SD 1.5.
    Outputs are float32; the models run in ``dtype`` on ``device``.
    """

    learned_variance = False  # SD 1.x: fixed posterior variance

    def __init__(self, unet, text_encoder, tokenizer, vae, files: StableDiffusionFiles, *,
                 class_prompts: dict[int, str], negative_prompt: str = "", image_size: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if not class_prompts:
            raise ValueError("class_prompts is empty: give at least one class label and its prompt")
        self.unet = _on(unet, device, dtype)
        self.text_encoder = _on(text_encoder, device, dtype)
        self.vae = _on(vae, device, dtype)
        self.tokenizer = tokenizer
        self.files = files
        self.fingerprint, self.vae_fingerprint = files.fingerprints(runtime_identity(device, dtype))
        self.prediction_type = files.prediction_type
        self.class_prompts = {int(k): str(p) for k, p in sorted(class_prompts.items())}
        self.negative_prompt = negative_prompt
        self.num_classes = max(self.class_prompts) + 1
        self.null_class = self.num_classes
        vcfg = vae.config
        self.scaling_factor = float(vcfg.scaling_factor)
        self.shift_factor = float(vcfg.shift_factor or 0.0)
        self.latent_shape = files.latent_shape
        self.generation_size = files.generation_size
        self.image_size = int(image_size)
        self.image_channels = int(vcfg.in_channels)
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = {"pipeline_dir": str(files.root)}
        self._betas = files.betas.clone()
        self._abar = torch.cumprod(1.0 - self._betas, 0).to(self.device, torch.float32)
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self._label_table: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def train_betas(self) -> torch.Tensor:
        """(T,) float64 betas of the training noise schedule (a copy)."""
        return self._betas.clone()

    # ------------------------------------------------------------------ prompts
    def prompt_for(self, label: int) -> str:
        """The prompt of a class label (``null_class``: the negative prompt)."""
        if int(label) == self.null_class:
            return self.negative_prompt
        if int(label) not in self.class_prompts:
            raise ValueError(f"class label {label} has no prompt; configured labels: {sorted(self.class_prompts)}")
        return self.class_prompts[int(label)]

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """(1, L, D) CLIP last hidden states of ``prompt`` padded to the tokenizer's
        ``model_max_length`` (SD 1.5: 77 x 768); computed once per prompt, then cached."""
        if prompt not in self._prompt_cache:
            ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            self._prompt_cache[prompt] = self.text_encoder(ids.to(self.device))[0].to(self.dtype)
        return self._prompt_cache[prompt]

    def _embeddings_for(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) labels -> (B, L, D) text embeddings, through a table built once per run."""
        if self._label_table is None:
            keys = [*self.class_prompts, self.null_class]
            table = torch.cat([self.encode_prompt(self.prompt_for(k)) for k in keys])
            row = torch.full((self.null_class + 1,), -1, dtype=torch.long)
            row[torch.tensor(keys)] = torch.arange(len(keys))
            self._label_table = (row, row.to(self.device), table)
        row_cpu, row, table = self._label_table
        # Checked on the CPU only (see DiffusersBackbone.denoise: no device sync per step).
        if labels.device.type == "cpu" and labels.numel():
            labels = labels.long()
            in_range = (labels >= 0) & (labels <= self.null_class)
            if not bool(in_range.all()) or bool((row_cpu[labels.clamp(0, self.null_class)] < 0).any()):
                raise ValueError(
                    f"class labels must be in {sorted(self.class_prompts)} or {self.null_class} (null), "
                    f"got {sorted(set(labels.tolist()))}"
                )
        return table[row[labels.to(self.device).long()]]

    # ------------------------------------------------------------------ the Backbone interface
    def _check(self, x: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"{name} must have shape (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}")

    def _resize(self, images: torch.Tensor, size: int) -> torch.Tensor:
        if images.shape[-1] == size:
            return images
        return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True,
                             align_corners=False).clamp(-1.0, 1.0)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, image_size, image_size) in [-1, 1] -> resized to ``generation_size`` ->
        posterior mean x scaling factor (B, C_lat, h, w) float32."""
        self._check(images, (self.image_channels, self.image_size, self.image_size), "images")
        x = self._resize(images.to(device=self.device, dtype=torch.float32), self.generation_size)
        mean = self.vae.encode(x.to(self.dtype)).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C_lat, h, w) -> (B, 3, image_size, image_size) float32 in [-1, 1]: decoded at
        ``generation_size``, then resized (antialiased bicubic)."""
        self._check(latents, self.latent_shape, "latents")
        z = latents.to(device=self.device, dtype=self.dtype) / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z).sample.float().clamp(-1.0, 1.0)
        return self._resize(images, self.image_size)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Noise prediction eps (B, C_lat, h, w) float32. x_t (B, C_lat, h, w); t (B,) or scalar
        training-step index; labels (B,) class labels or ``null_class`` (the negative prompt)."""
        self._check(x_t, self.latent_shape, "x_t")
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=self.device).long()
        t = t.expand(b) if t.ndim == 0 else t
        labels = torch.as_tensor(labels)
        if t.shape != (b,) or labels.shape != (b,):
            raise ValueError(f"t and labels must have shape ({b},), got {tuple(t.shape)} and {tuple(labels.shape)}")
        emb = self._embeddings_for(labels)
        x = x_t.to(device=self.device, dtype=self.dtype)
        out = self.unet(x, t, encoder_hidden_states=emb).sample.float()
        if self.prediction_type == "v_prediction":
            # v = sqrt(abar) eps - sqrt(1 - abar) x0  =>  eps = sqrt(abar) v + sqrt(1 - abar) x_t
            abar = self._abar[t].view(-1, 1, 1, 1)
            out = abar.sqrt() * out + (1.0 - abar).sqrt() * x.float()
        return out


# --------------------------------------------------------------------------- loading
def load_stable_diffusion(
    pipeline_dir: str | os.PathLike, *, class_prompts: dict[int, str], image_size: int,
    generation_size: int = 512, negative_prompt: str = "", device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionBackbone:
    """Load an SD-1.x pipeline root. Raises BackboneFilesError (missing folders, files or
    pickled-only weights) or BackboneMismatchError (components that do not fit), naming
    the file and the values."""
    from transformers import CLIPTextModel, CLIPTokenizer

    files = StableDiffusionFiles(pipeline_dir, generation_size)
    # low_cpu_mem_usage: the faster path needs `accelerate`, not a dependency.
    # Weights that lack a parameter of the config (a truncated or mismatched file) are refused,
    # not initialised at random (load_pretrained).
    unet = load_pretrained(UNet2DConditionModel, files.unet_dir, dtype)
    text_encoder = load_pretrained(CLIPTextModel, files.text_dir, dtype, library="transformers")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(files.tokenizer_dir, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise BackboneFilesError(f"{files.tokenizer_dir}: cannot load CLIPTokenizer ({e})") from e
    if len(tokenizer) > int(files.text_config.get("vocab_size", 0)):
        raise BackboneMismatchError(
            f"{files.tokenizer_dir}: {len(tokenizer)} tokens but the text encoder in {files.text_dir} has "
            f"vocab_size = {files.text_config.get('vocab_size')}; use the tokenizer of that text encoder"
        )
    if tokenizer.model_max_length > int(files.text_config.get("max_position_embeddings", 77)):
        raise BackboneMismatchError(
            f"{files.tokenizer_dir}: model_max_length = {tokenizer.model_max_length} exceeds "
            f"max_position_embeddings = {files.text_config.get('max_position_embeddings')} of {files.text_dir}"
        )
    vae, _ = load_vae(files.vae_dir, device=device, dtype=dtype, what=f"{WHAT}/vae")
    return StableDiffusionBackbone(unet, text_encoder, tokenizer, vae, files, class_prompts=class_prompts,
                                   negative_prompt=negative_prompt, image_size=image_size, device=device,
                                   dtype=dtype)


def prompts_of_classes(cfg) -> dict[int, str]:
    """{class label: prompt} of an ExperimentConfig: ``prompt_template`` with ``{name}`` =
    each configured class's readable name. Two classes sharing a label must share a prompt."""
    from ..data import open_dataset

    template = cfg.backbone.stable_diffusion.prompt_template
    prompts: dict[int, str] = {}
    for c in open_dataset(cfg.dataset).classes():
        prompt = template.format(name=c.name)
        if prompts.setdefault(c.label, prompt) != prompt:
            raise BackboneMismatchError(
                f"dataset.classes: label {c.label} is given to classes with prompts {prompts[c.label]!r} and "
                f"{prompt!r}; give each class its own label"
            )
    return prompts


def class_conditions(cfg) -> dict[str, str]:
    """{class id: its prompt}: renaming a class re-makes its images (``mgd3_assets.versions.class_version``)."""
    from ..data import open_dataset

    fill = cfg.backbone.stable_diffusion.prompt_template.format
    return {c.id: fill(name=c.name) for c in open_dataset(cfg.dataset).classes()}


def _experiment(cfg):
    return experiment_of(cfg, "the stable_diffusion backbone is prompted with the dataset's class names")


# --------------------------------------------------------------------------- the kind's interface
TRAINED_BY_PIPELINE = False  # observed: the backbone asset fingerprints the local files


def ensure(cfg, home: Path, progress=None) -> None:
    """Nothing to train: loading (``load``) is what checks the files."""


def load(cfg, home: Path | None = None) -> StableDiffusionBackbone:
    """The configured SD backbone (``backbone.kind: stable_diffusion``) of an ExperimentConfig."""
    exp = _experiment(cfg)
    sd = exp.backbone.stable_diffusion
    if exp.dataset.channels != 3:
        raise BackboneMismatchError(
            f"dataset.channels = {exp.dataset.channels}, but Stable Diffusion works on RGB images; set "
            "dataset.channels: 3"
        )
    return load_stable_diffusion(
        sd.pipeline_dir, class_prompts=prompts_of_classes(exp), image_size=exp.dataset.image_size,
        generation_size=sd.generation_size, negative_prompt=sd.negative_prompt,
        device=exp.backbone.device, dtype=DTYPES[exp.backbone.dtype],
    )


def fingerprint(cfg, home: Path | None = None, which: int = 0) -> str:
    """The fingerprint ``load`` would give (``which`` 1: its VAE's), without loading weights."""
    backbone = _experiment(cfg).backbone
    sd = backbone.stable_diffusion
    runtime = runtime_identity(backbone.device, DTYPES[backbone.dtype])
    return StableDiffusionFiles(sd.pipeline_dir, sd.generation_size).fingerprints(runtime)[which]


vae_fingerprint = partial(fingerprint, which=1)  # the VAE's: latent stores are kept under it


def version_inputs(cfg) -> dict:
    """An observed backbone has no code version: its data version is its fingerprint."""
    return {}


def describe(cfg) -> str:
    sd = cfg.backbone.stable_diffusion
    return f"Stable Diffusion {sd.pipeline_dir}, prompt {sd.prompt_template!r}, {sd.generation_size} px."
