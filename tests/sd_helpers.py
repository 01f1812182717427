"""A tiny random Stable Diffusion 1.x pipeline root built from the real classes.

``UNet2DConditionModel`` (2 blocks, cross-attention 32), ``CLIPTextModel``
(2 layers, width 32, 16 positions), a CLIP BPE tokenizer whose ``vocab.json`` /
``merges.txt`` are written here (lower-case letters, a few merges, the two special
tokens), an ``AutoencoderKL`` with factor 2 and SD 1.5's scheduler settings
(scaled-linear betas 0.00085 .. 0.012, 1000 steps). Everything is saved as
safetensors under ``root``; nothing is downloaded.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

# SD 1.5's scheduler/scheduler_config.json (the fields that matter here).
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
MAX_TOKENS = 16
MERGES = ["t e", "te n</w>", "c h", "c h</w>", "ch u", "chu r", "chur ch</w>"]


def write_tokenizer(tok_dir: Path, merges: list[str] = MERGES) -> int:
    """CLIP tokenizer files; returns the vocabulary size."""
    tok_dir.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase)
    tokens = letters + [c + "</w>" for c in letters] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    return len(vocab)


def build_tiny_sd(root: Path, *, latent_size: int = 8, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SD pipeline root; images are ``2 * latent_size`` px (VAE factor 2)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(root)
    vocab_size = write_tokenizer(root / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=4,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=2 * latent_size, scaling_factor=0.18215,
    )
    unet.save_pretrained(root / "unet", safe_serialization=True)
    text.save_pretrained(root / "text_encoder", safe_serialization=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**SD15_SCHEDULER, "prediction_type": prediction_type}))
    return root
