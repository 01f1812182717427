"""The embedded backbone: a small latent diffusion model trained by the pipeline.

No weights can be downloaded on a fresh machine, so the default experiment
trains its own stand-in for DiT-XL/2 + SD-VAE on the dataset's *training*
split (never the test split), on the CPU:

1. ``vae``: a small diffusers ``AutoencoderKL`` (MSE reconstruction + a small KL
   term); its ``scaling_factor`` is set to 1 / std of the training latents so
   the diffusion model sees unit-variance latents, as in latent diffusion.
2. ``encode``: the training images are encoded once (posterior mean x scaling
   factor); the DiT trains on these pre-encoded latents, which makes a DiT step
   independent of the image size and of the VAE's cost.
3. ``dit``: a class-conditional diffusers ``DiTTransformer2DModel`` (epsilon
   prediction, fixed variance, DiT's adaLN-Zero initialisation) with label
   dropout for the null class, AdamW with warm-up + cosine decay, EMA weights.

The result is saved in the diffusers pipeline layout (``vae/``, ``transformer/``,
``scheduler/``, safetensors) under ``home/backbones/embedded-<key>/`` and loaded
by the same code as a pretrained DiT (``load_backbone``). ``<key>`` hashes the
training settings, the dataset key and the class labels and
``TRAINING_CODE_VERSION``: unchanged inputs reuse the trained backbone.

Label dropout pitfall: each of diffusers' DiT blocks owns a label embedding with
its *own* class dropout (p = 0.1, built in). In training mode the blocks would
drop labels independently and disagree about the label; here the null label is
substituted once, before the model, and every block's dropout is set to 0.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from torch import nn

from ..config import EmbeddedDiTConfig, EmbeddedVAEConfig, ExperimentConfig
from .diffusers_backbone import betas_from_scheduler_config
from .training import LoopSettings, ProgressFn, train_loop
from .vae import load_vae

log = logging.getLogger(__name__)

# Bump whenever a change to this module (or training.py) changes the trained
# weights for the same settings: it is part of the backbone directory key, so
# the next run retrains instead of reusing a backbone the code would not produce.
TRAINING_CODE_VERSION = 1

BACKBONES_DIR = "backbones"


# --------------------------------------------------------------------------- identity
def _dataset(cfg: ExperimentConfig):
    from ..data import open_dataset

    return open_dataset(cfg.dataset)


def embedded_training_key(cfg: ExperimentConfig) -> str:
    """Hash of everything that determines the trained weights: the embedded
    training settings (not ``checkpoint_every``), the dataset key (data and its
    preprocessing), the classes and their labels, and the code version."""
    source = _dataset(cfg)
    settings = cfg.backbone.embedded.model_dump(mode="json")
    settings.pop("checkpoint_every")
    payload = {
        "code": TRAINING_CODE_VERSION,
        "settings": settings,
        "dataset": source.dataset_key,
        "classes": [[c.id, c.label] for c in source.classes()],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def embedded_backbone_dir(cfg: ExperimentConfig, home: Path) -> Path:
    """``home/backbones/embedded-<key>``: exists only once training completed."""
    return Path(home) / BACKBONES_DIR / f"embedded-{embedded_training_key(cfg)}"


# --------------------------------------------------------------------------- models
def _norm_groups(channels: list[int]) -> int:
    """Largest GroupNorm group count (<= 32) dividing every block's channels."""
    g = 32
    while any(c % g for c in channels):
        g //= 2
    return g


def build_vae(vae_cfg: EmbeddedVAEConfig, image_channels: int, image_size: int) -> AutoencoderKL:
    """An untrained ``AutoencoderKL``: (B, C, S, S) <-> (B, latent_channels, S/f, S/f),
    f = 2 ** (len(block_out_channels) - 1). No mid-block attention: at these
    sizes it costs more than it gives."""
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
        mid_block_add_attention=False,
    )


def disable_block_label_dropout(transformer: DiTTransformer2DModel) -> None:
    """Turn off the per-block class dropout diffusers builds into every DiT block
    (the null label is substituted once, outside the model; see module doc)."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0


def build_dit(dit_cfg: EmbeddedDiTConfig, latent_channels: int, latent_size: int, num_classes: int
              ) -> DiTTransformer2DModel:
    """An untrained class-conditional DiT on (B, C_lat, h, w) latents, fixed variance
    (out_channels = in_channels), labels 0 .. num_classes-1 plus the null label."""
    model = DiTTransformer2DModel(
        num_attention_heads=dit_cfg.num_attention_heads,
        attention_head_dim=dit_cfg.attention_head_dim,
        in_channels=latent_channels,
        out_channels=latent_channels,
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
    source = _dataset(cfg)
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
def _encode_mean(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mean
                      for i in range(0, len(images), batch_size)])


# --------------------------------------------------------------------------- stages
def _train_vae(cfg: ExperimentConfig, images: torch.Tensor, work: Path, key: str,
               progress: ProgressFn | None) -> Path:
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
    std = float(_encode_mean(vae, images).std())
    vae.register_to_config(scaling_factor=1.0 / std)
    out = work / "vae"
    tmp = work / "vae.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, out)
    (work / "vae.ckpt.safetensors").unlink(missing_ok=True)
    return out


def _train_dit(cfg: ExperimentConfig, latents: torch.Tensor, labels: torch.Tensor, num_classes: int,
               work: Path, key: str, progress: ProgressFn | None) -> tuple[DiTTransformer2DModel, DDPMScheduler]:
    dcfg = cfg.backbone.embedded.dit
    seed = _stage_seed(cfg.backbone.embedded.seed, "dit")
    scheduler = build_scheduler(dcfg)
    betas = betas_from_scheduler_config(dict(scheduler.config), "the embedded scheduler")
    abar = torch.cumprod(1 - betas, 0).float()
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


@contextmanager
def _lock(path: Path):
    """An exclusive lock file: two processes never train the same backbone at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log_progress(stage: str, step: int, total: int, metrics: dict) -> None:
    if step == total or step % max(total // 10, 1) == 0:
        log.info("embedded backbone %s: step %d/%d %s", stage, step, total,
                 {k: round(v, 5) for k, v in metrics.items() if isinstance(v, float)})


def ensure_embedded_backbone(cfg: ExperimentConfig, home: Path, progress: ProgressFn | None = None) -> Path:
    """Train the embedded backbone of ``cfg`` (or reuse it) and return its directory.

    The directory is a diffusers pipeline root (``vae/``, ``transformer/``,
    ``scheduler/``, ``model_index.json``, ``training.json``) that
    ``load_backbone`` reads like any pretrained DiT. Training is deterministic
    given ``backbone.embedded.seed``, reports ``progress(stage, step, total,
    metrics)`` for stages "vae", "encode" and "dit", checkpoints every
    ``checkpoint_every`` steps in ``<dir>.partial/`` and resumes from there after
    an interruption, to the same weights as an uninterrupted run.
    """
    if cfg.backbone.kind != "embedded":
        raise ValueError(f"backbone.kind is {cfg.backbone.kind!r}; ensure_embedded_backbone needs 'embedded'")
    final = embedded_backbone_dir(cfg, home)
    if final.is_dir():
        return final
    progress = progress or _log_progress
    with _lock(final.with_name(final.name + ".lock")):
        if final.is_dir():  # trained by another process while we waited
            return final
        key = final.name
        for stale in final.parent.glob(final.name + ".tmp*"):  # a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        work = final.with_name(final.name + ".partial")
        work.mkdir(parents=True, exist_ok=True)
        images, labels, num_classes = training_images(cfg)
        timings = {}

        t0 = time.perf_counter()
        vae_dir = work / "vae"
        if not (vae_dir / "config.json").is_file():
            _train_vae(cfg, images, work, key, progress)
        timings["vae_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        # Always encode with the *saved* VAE, so a resumed run sees the same latents.
        vae, vae_fp = load_vae(vae_dir, what="embedded VAE")
        latents = _encode_mean(vae, images) * vae.config.scaling_factor
        progress("encode", 1, 1, {"latent_std": float(latents.std())})
        timings["encode_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        dit, scheduler = _train_dit(cfg, latents, labels, num_classes, work, key, progress)
        timings["dit_s"] = time.perf_counter() - t0

        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        shutil.copytree(vae_dir, tmp / "vae")
        dit.save_pretrained(tmp / "transformer", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "DiTPipeline",
            "_diffusers_version": diffusers.__version__,
            "transformer": ["diffusers", "DiTTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "DDPMScheduler"],
        }, indent=2))
        source = _dataset(cfg)
        (tmp / "training.json").write_text(json.dumps({
            "key": key,
            "code_version": TRAINING_CODE_VERSION,
            "settings": cfg.backbone.embedded.model_dump(mode="json"),
            "dataset_key": source.dataset_key,
            "classes": [{"id": c.id, "name": c.name, "label": c.label} for c in source.classes()],
            "train_images": len(images),
            "num_classes": num_classes,
            "scaling_factor": float(vae.config.scaling_factor),
            "vae_fingerprint": vae_fp,
            "dit_parameters": sum(p.numel() for p in dit.parameters()),
            "vae_parameters": sum(p.numel() for p in vae.parameters()),
            "timings_s": timings,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "threads": torch.get_num_threads(),
        }, indent=2))
        os.replace(tmp, final)
        shutil.rmtree(work, ignore_errors=True)
        return final
