"""The public pretrained architectures, with random weights: DiT-XL/2 (256 px) and the SD VAE.

For rehearsing the paper-scale path where the real weights are not available
(this project never downloads anything): the configs below are those of
``facebook/DiT-XL-2-256`` (diffusers ``DiTTransformer2DModel``: 28 blocks,
16 heads x 72 = 1152 hidden, patch 2, 4 x 32 x 32 latents, 8 output channels
= epsilon + learned sigma range, 1,000 classes + the null label; DiT's linear
betas 1e-4 .. 0.02 over 1,000 steps) and ``stabilityai/sd-vae-ft-mse``
(``AutoencoderKL``, blocks 128/256/512/512, 2 layers each, 4 latent channels,
x8 downsampling, scaling factor 0.18215, 256 px). :func:`save_reference_backbone`
writes them in the diffusers layout with safetensors, where
``backbone.kind: pretrained`` loads them like the real ones.
"""

from __future__ import annotations

from pathlib import Path

import torch

# facebook/DiT-XL-2-256, transformer/config.json (diffusers' DiTTransformer2DModel).
DIT_XL_2_256 = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "attention_bias": True,
    "sample_size": 32,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "upcast_attention": False,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}

# stabilityai/sd-vae-ft-mse, config.json.
SD_VAE_FT_MSE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

# DiT's training schedule (the DiT-XL-2-256 pipeline's scheduler/scheduler_config.json).
DIT_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                 "prediction_type": "epsilon", "clip_sample": False}


def build_reference_dit(depth: int | None = None):
    """A random ``DiTTransformer2DModel`` of the DiT-XL/2 architecture; ``depth`` blocks
    (default all 28). Width, heads, patch, latent shape and classes are never changed."""
    from diffusers import DiTTransformer2DModel

    config = dict(DIT_XL_2_256)
    if depth is not None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1 (DiT-XL/2 has 28 blocks), got {depth}")
        config["num_layers"] = depth
    return DiTTransformer2DModel(**config)


def build_reference_vae():
    """A random ``AutoencoderKL`` of the sd-vae-ft-mse architecture."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**SD_VAE_FT_MSE)


def save_reference_backbone(root: Path, *, depth: int | None = None, seed: int = 0) -> tuple[Path, Path]:
    """Write random-weight DiT-XL/2 and SD VAE in the diffusers layout (safetensors).

    Returns (``root/DiT-XL-2-256`` with ``transformer/`` and ``scheduler/``,
    ``root/sd-vae-ft-mse``): the values of ``backbone.transformer_dir`` and
    ``backbone.vae_dir``. The same ``seed`` and ``depth`` give the same weights.
    """
    from diffusers import DDPMScheduler

    root = Path(root)
    dit_dir, vae_dir = root / "DiT-XL-2-256", root / "sd-vae-ft-mse"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = build_reference_dit(depth)
        vae = build_reference_vae()
    dit.save_pretrained(dit_dir / "transformer", safe_serialization=True)
    DDPMScheduler(**DIT_SCHEDULER).save_pretrained(dit_dir / "scheduler")
    vae.save_pretrained(vae_dir, safe_serialization=True)
    return dit_dir, vae_dir
