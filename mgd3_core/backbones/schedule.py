"""Noise-schedule math, in one place: the training schedule of a backbone (from a
diffusers scheduler config) and its respacing to the sampler's steps.

Every tensor here is float64 on the CPU; the sampler casts what it needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .diffusers_files import BackboneMismatchError

# DiT (Peebles & Xie 2023) was trained with the ADM linear schedule; used when a
# transformer directory comes without a scheduler config.
DIT_DEFAULT_SCHEDULE = {
    "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
}


def betas_from_scheduler_config(config: dict, where: str) -> torch.Tensor:
    """(T,) float64 betas of a diffusers scheduler config (same formulas as
    ``DDPMScheduler``, computed in float64). ``where`` names the file in errors."""
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise BackboneMismatchError(
            f"{where}: prediction_type is {config.get('prediction_type')!r}; the sampler needs an "
            "epsilon-prediction model"
        )
    if config.get("rescale_betas_zero_snr"):
        raise BackboneMismatchError(
            f"{where}: rescale_betas_zero_snr is not supported (x0 is undefined at zero terminal SNR)"
        )
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    else:
        n = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        kind = config.get("beta_schedule", "linear")
        if kind == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float64)
        elif kind == "scaled_linear":  # latent diffusion's schedule
            betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
        elif kind == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17
            def abar(t: float) -> float:
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = torch.tensor(
                [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float64
            )
        else:
            raise BackboneMismatchError(
                f"{where}: beta_schedule {kind!r} is not supported; use linear, scaled_linear, "
                "squaredcos_cap_v2 or trained_betas"
            )
    if betas.ndim != 1 or betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
        raise BackboneMismatchError(f"{where}: betas must be a 1-D list of values in (0, 1)")
    return betas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """(T,) abar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4)."""
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True)
class RespacedSchedule:
    """A training schedule respaced to S steps (improved-DDPM / DiT ``space_timesteps``).

    All tensors are (S,) float64 on the CPU, indexed by the step index t;
    ``timesteps[t]`` is the training-schedule index the denoiser is called with.
    """

    timesteps: torch.Tensor  # (S,) long
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor  # multiplies x0_hat
    posterior_mean_coef2: torch.Tensor  # multiplies x_t

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel())


def respace_schedule(train_betas: torch.Tensor, steps: int) -> RespacedSchedule:
    """Keep ``steps`` evenly spaced training timesteps (first and last included) and
    recompute the betas so that the kept ``abar`` values are unchanged."""
    train_betas = train_betas.detach().to(torch.float64).cpu()
    T = train_betas.numel()
    if not 1 <= steps <= T:
        raise ValueError(f"sampler.steps = {steps} must be in [1, {T}] (the backbone's training steps)")
    train_abar = alphas_cumprod(train_betas)
    if steps == 1:
        kept = [T - 1]
    else:
        stride = (T - 1) / (steps - 1)
        kept = sorted({round(i * stride) for i in range(steps)})
    timesteps = torch.tensor(kept, dtype=torch.long)
    abar = train_abar[timesteps]
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    betas = 1.0 - abar / abar_prev
    # q(x_{t-1} | x_t, x_0): Ho et al. 2020, eq. 6-7.
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # The variance is 0 at t = 0; clip the log like improved-DDPM does.
    post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if steps > 1 else torch.log(betas)
    return RespacedSchedule(
        timesteps=timesteps,
        betas=betas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=betas * torch.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * torch.sqrt(1.0 - betas) / (1.0 - abar),
    )
