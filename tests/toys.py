"""Small stand-ins used by several tests: analytic backbones (no training, no files), a tiny
embedded experiment config, and the accuracy rows of a fake λ × t_stop grid for the report."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import torch
from PIL import Image

from mgd3_core.config import ExperimentConfig, config_from_dict


def linear_betas(T: int = 1000) -> torch.Tensor:
    return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)


class GaussianToyBackbone:
    """Implements the Backbone protocol with the exact denoiser of a Gaussian data
    distribution: class c has x0 ~ N(mu_c, s^2 I); the null class has mean 0.

    E[x0 | x_t] = mu + sqrt(abar) s^2 / (abar s^2 + 1 - abar) (x_t - sqrt(abar) mu),
    eps = (x_t - sqrt(abar) E[x0|x_t]) / sqrt(1 - abar).
    """

    learned_variance = False
    scaling_factor = 1.0
    image_size = 4
    image_channels = 2

    def __init__(self, num_classes: int = 3, shape=(2, 4, 4), s: float = 0.5, seed: int = 0, learned_variance=False):
        g = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        self.null_class = num_classes
        self.latent_shape = tuple(shape)
        self.means = torch.randn((num_classes, *shape), generator=g) * 2.0
        self.s = s
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.fingerprint = "toy"
        self.vae_fingerprint = "toy-vae"
        self.learned_variance = learned_variance
        self.calls = 0
        self._abar = torch.cumprod(1 - linear_betas(), 0)

    def train_betas(self) -> torch.Tensor:
        return linear_betas()

    def encode(self, images):
        return images

    def decode(self, latents):
        return latents.clamp(-1, 1)

    def denoise(self, x_t, t, labels):
        self.calls += 1
        abar = self._abar[t].to(x_t.dtype).view(-1, 1, 1, 1)
        mu = torch.zeros_like(x_t)
        cond = labels < self.num_classes
        mu[cond] = self.means[labels[cond]]
        gain = abar.sqrt() * self.s**2 / (abar * self.s**2 + 1 - abar)
        x0 = mu + gain * (x_t - abar.sqrt() * mu)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        if self.learned_variance:
            # Variance channels that depend on the label: tests can see which half was used.
            v = (labels.float() / (self.num_classes + 1)).view(-1, 1, 1, 1).expand_as(eps)
            return torch.cat([eps, v], 1)
        return eps


def tiny_embedded_config(**dit) -> ExperimentConfig:
    """A three-class embedded experiment whose backbone trains in seconds; ``dit`` overrides its DiT settings."""
    return config_from_dict({
        "dataset": {"classes": ["0", "1", "2"], "max_per_class": 12, "image_size": 16},
        "backbone": {"embedded": {
            "vae": {"block_out_channels": [8, 8], "latent_channels": 2, "steps": 3, "batch_size": 8},
            "dit": {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2,
                    "steps": 4, "batch_size": 8, "warmup_steps": 1, "num_train_timesteps": 100, **dit},
            "checkpoint_every": 2,
            "threads": 1,  # tiny models: one thread avoids OpenMP barrier stalls on a busy machine
        }},
    })


# ----------------------------------------------------------------- report inputs
def grid_accuracy() -> tuple[pd.DataFrame, dict]:
    """A λ × t_stop grid of mgd3 (3 x 3) beside three baselines, student rows of two seeds 1 apart
    (variant mean 80.5 + λ·(t_stop + 1)), and the report's ``variants`` for it."""
    variants = {"unguided": ("unguided", {"guidance_strength": 0.0, "t_stop": None}),
                "random_real": ("random_real", {"guidance_strength": None, "t_stop": None}),
                "closest_real": ("closest_real", {"guidance_strength": None, "t_stop": None})}
    means = {"unguided": 70.0, "random_real": 75.0, "closest_real": 85.0}
    for lam in (0.05, 0.1, 0.2):
        for t_stop in (0, 10, 25):
            name = f"mgd3~guidance_strength={lam:g}~t_stop={t_stop}"
            variants[name] = ("mgd3", {"guidance_strength": lam, "t_stop": t_stop})
            means[name] = 80.0 + lam * (t_stop + 1)
    rows = [{"method": m, "ipc": 10, "student": "convnet", "protocol": "hard", "gen_seed": g, "train_seed": 0,
             "final_acc": mean + g, "best_acc": mean + g} for m, mean in means.items() for g in (0, 1)]
    rows += [{"method": "full_data", "ipc": np.nan, "student": "convnet", "protocol": "hard", "gen_seed": 0,
              "train_seed": 0, "final_acc": 98.0, "best_acc": 98.0}]
    return pd.DataFrame(rows), variants


def pixels_of(png: bytes, color: str) -> int:
    """Pixels of exactly ``color`` ("#rrggbb") in a PNG: a plotted line's colour is there or not."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    return int((rgb == [int(color[i:i + 2], 16) for i in (1, 3, 5)]).all(1).sum())
