"""The embedded backbone's models and training stages (see ``embedded.py`` for the
whole procedure): a small ``AutoencoderKL`` and a class-conditional
``DiTTransformer2DModel`` built from the config, trained with ``train_loop``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from torch import nn

from ..config import EmbeddedDiTConfig, EmbeddedVAEConfig, ExperimentConfig
from ..progress import TrainingProgress
from .schedule import alphas_cumprod, betas_from_scheduler_config
from .train_loop import LoopSettings, train_loop


# --------------------------------------------------------------------------- models
def _norm_groups(channels: list[int]) -> int:
    """Largest GroupNorm group count (<= 32) dividing every block's channels."""
    g = 32
    while any(c % g for c in channels):
        g //= 2
    return g


def build_vae(vae_cfg: EmbeddedVAEConfig, image_channels: int, image_size: int, *,
              mid_block_attention: bool = False) -> AutoencoderKL:
    """An untrained ``AutoencoderKL``: (B, C, S, S) <-> (B, latent_channels, S/f, S/f),
    f = 2 ** (len(block_out_channels) - 1). The embedded VAE has no mid-block attention
    (at its sizes it costs more than it gives); SD-VAE's architecture has it."""
    n = len(vae_cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=image_channels,
        out_channels=image_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(vae_cfg.block_out_channels),
        layers_per_block=vae_cfg.layers_per_block,
        latent_channels=vae_cfg.latent_channels,
        norm_num_groups=_norm_groups(vae_cfg.block_out_channels),
        sample_size=image_size,
        mid_block_add_attention=mid_block_attention,
    )


def disable_block_label_dropout(transformer: DiTTransformer2DModel) -> None:
    """Turn off the per-block class dropout diffusers builds into every DiT block
    (the null label is substituted once, outside the model; see module doc)."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0


def build_dit(dit_cfg: EmbeddedDiTConfig, latent_channels: int, latent_size: int, num_classes: int, *,
              learned_sigma: bool = False) -> DiTTransformer2DModel:
    """An untrained class-conditional DiT on (B, C_lat, h, w) latents, labels 0 .. num_classes-1
    plus the null label; fixed variance (out_channels = in_channels, the embedded backbone) or,
    with ``learned_sigma``, DiT-XL/2's 2 x in_channels outputs."""
    model = DiTTransformer2DModel(
        num_attention_heads=dit_cfg.num_attention_heads,
        attention_head_dim=dit_cfg.attention_head_dim,
        in_channels=latent_channels,
        out_channels=2 * latent_channels if learned_sigma else latent_channels,
        num_layers=dit_cfg.num_layers,
        sample_size=latent_size,
        patch_size=dit_cfg.patch_size,
        num_embeds_ada_norm=num_classes,
    )
    disable_block_label_dropout(model)
    _dit_init_(model)
    return model


def _dit_init_(model: DiTTransformer2DModel) -> None:
    """DiT's initialisation (Peebles & Xie 2023, sec. 3.2): Xavier-uniform linear
    layers, N(0, 0.02) label and timestep embeddings, and adaLN-Zero: every
    block's modulation and the output layer start at zero, so each block starts
    as the identity. diffusers keeps PyTorch's default init, which trains
    markedly slower in short runs."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    proj = model.pos_embed.proj  # patch embedding: initialise like a linear layer
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def build_scheduler(dit_cfg: EmbeddedDiTConfig) -> DDPMScheduler:
    """The training noise schedule, saved as ``scheduler/`` next to the models."""
    return DDPMScheduler(
        num_train_timesteps=dit_cfg.num_train_timesteps,
        beta_schedule=dit_cfg.beta_schedule,
        beta_start=1e-4 * 1000 / dit_cfg.num_train_timesteps,
        beta_end=0.02 * 1000 / dit_cfg.num_train_timesteps,
        prediction_type="epsilon",
        variance_type="fixed_small",
        clip_sample=False,
    )


# --------------------------------------------------------------------------- data
def training_images(cfg: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The training split: images (N, C, H, W) float32 in [-1, 1], backbone labels
    (N,) long, and the number of label embeddings (max label + 1)."""
    from ..data import open_dataset

    source = open_dataset(cfg.dataset)
    classes = source.classes()
    images, labels = [], []
    for c in classes:
        ids = source.items(c.id, "train")
        if not ids:
            raise ValueError(f"class {c.id!r} has no training images; the embedded backbone needs some")
        images.append(torch.from_numpy(source.load(c.id, "train", ids)))
        labels.append(torch.full((len(ids),), c.label, dtype=torch.long))
    x = torch.cat(images).float().div_(127.5).sub_(1.0)
    return x, torch.cat(labels), max(c.label for c in classes) + 1


def _stage_seed(seed: int, stage: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{stage}".encode()).digest()[:8], "little") >> 1


@contextmanager
def _seeded(seed: int):
    """Seed the global RNG for model initialisation without disturbing the caller's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def encode_mean(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mean
                      for i in range(0, len(images), batch_size)])


# --------------------------------------------------------------------------- stages
def train_vae(cfg: ExperimentConfig, images: torch.Tensor, work: Path, key: str,
               progress: TrainingProgress | None) -> Path:
    vcfg = cfg.backbone.embedded.vae
    seed = _stage_seed(cfg.backbone.embedded.seed, "vae")
    with _seeded(seed):
        vae = build_vae(vcfg, images.shape[1], images.shape[-1])

    def loss_fn(model: AutoencoderKL, g: torch.Generator):
        idx = torch.randint(len(images), (vcfg.batch_size,), generator=g)
        x = images[idx]
        posterior = model.encode(x).latent_dist
        rec = model.decode(posterior.sample(generator=g)).sample
        mse = torch.mean((rec - x) ** 2)
        kl = posterior.kl().mean()  # summed over latent cells, averaged over the batch
        return mse + vcfg.kl_weight * kl, {"mse": float(mse.detach()), "kl": float(kl.detach())}

    settings = LoopSettings(
        steps=vcfg.steps, lr=vcfg.lr, warmup_steps=min(100, vcfg.steps // 10),
        checkpoint_every=cfg.backbone.embedded.checkpoint_every,
    )
    train_loop(vae, loss_fn, settings, seed=seed + 1, stage="vae", checkpoint=work / "vae.ckpt.safetensors",
               key=f"{key}/vae", progress=progress)
    # Latent diffusion's scaling: unit-variance latents for the diffusion model.
    std = float(encode_mean(vae, images).std())
    vae.register_to_config(scaling_factor=1.0 / std)
    out = work / "vae"
    tmp = work / "vae.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, out)
    (work / "vae.ckpt.safetensors").unlink(missing_ok=True)
    return out


def train_dit(cfg: ExperimentConfig, latents: torch.Tensor, labels: torch.Tensor, num_classes: int,
               work: Path, key: str, progress: TrainingProgress | None) -> tuple[DiTTransformer2DModel, DDPMScheduler]:
    dcfg = cfg.backbone.embedded.dit
    seed = _stage_seed(cfg.backbone.embedded.seed, "dit")
    scheduler = build_scheduler(dcfg)
    betas = betas_from_scheduler_config(dict(scheduler.config), "the embedded scheduler")
    abar = alphas_cumprod(betas).float()
    snr = abar / (1 - abar)
    with _seeded(seed):
        dit = build_dit(dcfg, latents.shape[1], latents.shape[-1], num_classes)
    null = num_classes

    def loss_fn(model: DiTTransformer2DModel, g: torch.Generator):
        b = dcfg.batch_size
        idx = torch.randint(len(latents), (b,), generator=g)
        x0, y = latents[idx], labels[idx]
        # Classifier-free guidance training: one null-label substitution for the
        # whole model (every block sees the same label).
        y = torch.where(torch.rand(b, generator=g) < dcfg.label_dropout, null, y)
        t = torch.randint(dcfg.num_train_timesteps, (b,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # q(x_t | x_0), Ho et al. 2020 eq. 4
        eps = model(x_t, timestep=t, class_labels=y).sample
        per_sample = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
        if dcfg.min_snr_gamma:
            # Min-SNR-gamma weighting for epsilon prediction (Hang et al. 2023): min(SNR, g) / SNR.
            per_sample = per_sample * torch.clamp(snr[t], max=dcfg.min_snr_gamma) / snr[t]
        return per_sample.mean(), {}

    settings = LoopSettings(
        steps=dcfg.steps, lr=dcfg.lr, warmup_steps=dcfg.warmup_steps, ema_decay=dcfg.ema_decay,
        checkpoint_every=cfg.backbone.embedded.checkpoint_every,
    )
    ema = train_loop(dit, loss_fn, settings, seed=seed + 1, stage="dit",
                     checkpoint=work / "dit.ckpt.safetensors", key=f"{key}/dit", progress=progress)
    if ema is not None:
        dit.load_state_dict(ema)
    return dit, scheduler
