"""Mode-guided diffusion sampling (MGD3, ICML 2025) as a pure loop.

The sampler is a function of a backbone (the denoiser and its training noise
schedule), the per-image labels, modes and seeds, and the sampler settings.
Nothing here knows about files or Dagster.

Notation (MGD3, ICML 2025, Sec. 3.2 and Alg. 1): the training schedule is respaced to S steps;
step index ``t = S-1 ... 0``; ``abar_t`` is the cumulative alpha at step t;
``w`` the classifier-free guidance scale; ``lambda`` the mode-guidance strength (``guidance_strength``);
guidance is applied while ``t > t_stop``.

Unguided sampling is *the same loop* with ``lambda = 0`` (or ``t_stop = S``, or no
modes): the guidance line is then skipped, so the result is bit-identical.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from .backbones.base import Backbone
from .backbones.schedule import RespacedSchedule, respace_schedule


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SamplerSettings:
    """Every setting of the guided sampler (MGD3 Sec. 3.2: steps, CFG scale, guidance strength
    lambda, t_stop, DDPM or DDIM). ``SamplerConfig`` (config.py) converts with ``from_config``."""

    steps: int = 50
    cfg_scale: float = 4.0
    guidance_strength: float = 0.1  # lambda
    t_stop: int = 25
    kind: Literal["ddpm", "ddim"] = "ddpm"
    cfg_channels: int | None = None  # guide the first k noise channels; None = all
    # How lambda varies over the guided steps t = S-1 ... t_stop+1: "constant" (the paper: lambda,
    # then a hard stop), or fading from lambda at t = S-1 to 0 at t_stop, "linear" or "cosine".
    guidance_schedule: Literal["constant", "linear", "cosine"] = "constant"

    def __post_init__(self) -> None:
        if self.guidance_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"guidance_schedule {self.guidance_schedule!r} must be constant, linear or cosine")
        if self.cfg_channels is not None and self.cfg_channels < 1:
            raise ValueError(f"cfg_channels = {self.cfg_channels} must be >= 1 (or None for all channels)")
        if not 0 <= self.t_stop <= self.steps:
            raise ValueError(f"t_stop = {self.t_stop} must be in [0, steps = {self.steps}]")
        if self.guidance_strength < 0:
            raise ValueError(f"guidance_strength (lambda) = {self.guidance_strength} must be >= 0")
        if self.kind not in ("ddpm", "ddim"):
            raise ValueError(f"sampler kind {self.kind!r} must be 'ddpm' or 'ddim'")

    @classmethod
    def from_config(cls, cfg) -> "SamplerSettings":
        return cls(
            steps=cfg.steps,
            cfg_scale=cfg.cfg_scale,
            guidance_strength=cfg.guidance_strength,
            t_stop=cfg.t_stop,
            kind=cfg.kind,
            cfg_channels=None if getattr(cfg, "cfg_channels", "all") == "all" else int(cfg.cfg_channels),
            guidance_schedule=getattr(cfg, "guidance_schedule", "constant"),
        )

    def guided_at(self, t: int) -> bool:
        """Mode guidance is on for the early steps t = S-1 ... t_stop+1."""
        return self.guidance_strength > 0 and t > self.t_stop

    def strength_at(self, t: int) -> float:
        """lambda at step t (0 where guidance is off): constant, or faded linearly or along a
        half cosine from lambda at t = S-1 to 0 at t_stop."""
        if not self.guided_at(t):
            return 0.0
        if self.guidance_schedule == "constant":
            return self.guidance_strength
        u = (t - self.t_stop) / max(self.steps - 1 - self.t_stop, 1)  # 1 at t = S-1, -> 0 at t_stop
        shape = u if self.guidance_schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * u))
        return self.guidance_strength * shape

    def as_dict(self) -> dict:
        """The settings as manifest columns (``distilled.MANIFEST_COLUMNS``), in that order; a
        schedule other than the paper's constant lambda adds its own column."""
        row = {
            "lambda": self.guidance_strength,
            "t_stop": self.t_stop,
            "cfg_scale": self.cfg_scale,
            "cfg_channels": "all" if self.cfg_channels is None else self.cfg_channels,
            "steps": self.steps,
            "sampler": self.kind,
        }
        if self.guidance_schedule != "constant":
            row["guidance_schedule"] = self.guidance_schedule
        return row


# --------------------------------------------------------------------------- helpers
def image_seed(global_seed: int, class_id: str, ipc: int, mode_index: int) -> int:
    """The seed of one distilled image: a function of its identity only, so an
    image never depends on the batch it was generated in or the order of classes."""
    key = f"{global_seed}/{class_id}/{ipc}/{mode_index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def cfg_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps = eps_u + w (eps_c - eps_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, abar: float) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    return (x_t - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)


def mode_pull(mode: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
    """The direction MGD3 pushes in: from the current clean estimate to the mode."""
    return mode - x0_hat


# --------------------------------------------------------------------------- one step
@dataclass(frozen=True)
class StepOutput:
    """Result of one reverse step. Shapes (B, C, h, w)."""

    prev_sample: torch.Tensor  # x_{t-1}
    pred_original_sample: torch.Tensor  # x0_hat (from the unmodified CFG noise estimate)
    mean: torch.Tensor  # mu_t
    std: torch.Tensor | float  # sigma_t, (B,C,h,w) for learned variance


def guided_ddpm_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    schedule: RespacedSchedule,
    *,
    noise: torch.Tensor | None,
    mode: torch.Tensor | None = None,
    guidance_strength: float = 0.0,
    variance_values: torch.Tensor | None = None,
) -> StepOutput:
    """One ancestral DDPM step with MGD3 mode guidance.

    x_t, eps, noise, mode, variance_values: (B, C, h, w). ``variance_values`` are
    a learned-sigma model's extra channels (in [-1, 1]); None means the fixed
    posterior variance. ``mode`` None or ``guidance_strength`` 0 is plain DDPM.
    """
    abar = float(schedule.alphas_cumprod[t])
    x0_hat = predict_x0(x_t, eps, abar)
    # Posterior mean mu_t = c1 x0_hat + c2 x_t (Ho et al. 2020, eq. 7).
    mean = float(schedule.posterior_mean_coef1[t]) * x0_hat + float(schedule.posterior_mean_coef2[t]) * x_t
    if variance_values is None:
        log_var: torch.Tensor | float = float(schedule.posterior_log_variance_clipped[t])
        std: torch.Tensor | float = math.exp(0.5 * log_var)
    else:
        # Learned range (Nichol & Dhariwal 2021, eq. 15): interpolate log beta and log beta~.
        min_log = float(schedule.posterior_log_variance_clipped[t])
        max_log = math.log(float(schedule.betas[t]))
        frac = (variance_values.to(x_t.dtype) + 1.0) / 2.0
        std = torch.exp(0.5 * (frac * max_log + (1.0 - frac) * min_log))

    x_prev = mean
    if mode is not None and guidance_strength > 0:
        # MGD3 mode guidance: x_{t-1} = mu_t + lambda * sigma_t * (m - x0_hat) + sigma_t * z
        x_prev = x_prev + guidance_strength * std * mode_pull(mode, x0_hat)
    if noise is not None and t > 0:
        x_prev = x_prev + std * noise
    return StepOutput(prev_sample=x_prev, pred_original_sample=x0_hat, mean=mean, std=std)


def guided_ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    schedule: RespacedSchedule,
    *,
    noise: torch.Tensor | None,
    mode: torch.Tensor | None = None,
    guidance_strength: float = 0.0,
    eta: float = 0.0,
) -> StepOutput:
    """One DDIM step with MGD3 guidance in its noise form (paper, Algorithm 1).

    Shapes (B, C, h, w). With ``eta = 0`` the step is deterministic.
    """
    abar = float(schedule.alphas_cumprod[t])
    abar_prev = float(schedule.alphas_cumprod_prev[t])
    x0_hat = predict_x0(x_t, eps, abar)
    if mode is not None and guidance_strength > 0:
        # MGD3 (Alg. 1): eps_hat = eps - sqrt(1 - abar_t) * lambda * (m - x0_hat)
        eps = eps - math.sqrt(1.0 - abar) * guidance_strength * mode_pull(mode, x0_hat)
    x0_guided = predict_x0(x_t, eps, abar)
    # Song et al. 2021, eq. 12 and 16.
    sigma = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    mean = math.sqrt(abar_prev) * x0_guided + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps
    x_prev = mean
    if noise is not None and t > 0 and sigma > 0:
        x_prev = x_prev + sigma * noise
    return StepOutput(prev_sample=x_prev, pred_original_sample=x0_hat, mean=mean, std=sigma)


# --------------------------------------------------------------------------- the loop
@dataclass
class SampleResult:
    latents: torch.Tensor  # (N, C, h, w) float32 on the CPU
    settings: SamplerSettings
    seeds: list[int]


@dataclass(frozen=True)
class StepInfo:
    """What the per-step callback sees (one batch, one step)."""

    batch_index: int
    n_batches: int
    step: int  # t, counting down S-1 ... 0
    steps: int
    guided: bool
    x_t: torch.Tensor  # (B, C, h, w) before the step
    x0_hat: torch.Tensor
    x_prev: torch.Tensor
    image_indices: range  # positions of this batch's images in the request


class _PerImageNoise:
    """One CPU generator per image: the noise an image sees never depends on the
    batch it is in (the initial noise first, then one draw per step)."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape = shape

    def draw(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])


def _to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """CPU tensor to ``device``; to a GPU through pinned memory, without blocking the host."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def denoise_with_cfg(
    backbone: Backbone, x: torch.Tensor, t_train: int, labels: torch.Tensor, cfg_scale: float,
    cfg_channels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (doubled) denoiser call. Returns (eps, variance_values or None).

    CFG is applied to the noise channels only; a learned-variance model's extra
    channels are taken from the conditional half (as DiT does). ``cfg_channels = k``
    guides only the first k noise channels and keeps the others conditional, as the
    DiT reference code's ``forward_with_cfg`` does with k = 3; None guides all.
    """
    c = x.shape[1]
    t_vec = torch.full((x.shape[0],), t_train, dtype=torch.long, device=x.device)
    if cfg_scale == 1.0:
        out = backbone.denoise(x, t_vec, labels)
        eps_c, rest_c = out[:, :c], out[:, c:]
        eps = eps_c
    else:
        null = torch.full_like(labels, backbone.null_class)
        out = backbone.denoise(torch.cat([x, x]), torch.cat([t_vec, t_vec]), torch.cat([labels, null]))
        out_c, out_u = out.chunk(2)
        eps_c, rest_c = out_c[:, :c], out_c[:, c:]
        k = c if cfg_channels is None else cfg_channels
        if k > c:
            raise ValueError(f"sampler.cfg_channels = {k} exceeds the backbone's {c} latent channels")
        eps = cfg_combine(eps_c, out_u[:, :c], cfg_scale)
        if k < c:
            # DiT reference (forward_with_cfg): guided first k channels, the rest from the conditional half.
            eps = torch.cat([eps[:, :k], eps_c[:, k:]], dim=1)
    variance = rest_c if backbone.learned_variance else None
    return eps, variance


@torch.inference_mode()
def sample(
    backbone: Backbone,
    labels: torch.Tensor | Sequence[int],
    seeds: Sequence[int],
    *,
    modes: torch.Tensor | None = None,
    settings: SamplerSettings | None = None,
    batch_size: int = 100,
    callback: Callable[[StepInfo], None] | None = None,
) -> SampleResult:
    """Generate one latent per request.

    labels: (N,) backbone class labels; seeds: N per-image seeds (``image_seed``);
    modes: (N, C, h, w) the mode each image is guided to (None = unguided).
    Returns latents (N, C, h, w) float32 on the CPU. An image's result depends
    only on its label, mode, seed and the settings, not on ``batch_size``.
    """
    settings = settings or SamplerSettings()
    if hasattr(settings, "model_dump") and not isinstance(settings, SamplerSettings):
        settings = SamplerSettings.from_config(settings)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    n = labels.numel()
    if len(seeds) != n:
        raise ValueError(f"got {n} labels but {len(seeds)} seeds; give one seed per image")
    shape = tuple(backbone.latent_shape)
    if modes is not None:
        modes = torch.as_tensor(modes, dtype=torch.float32)
        if modes.shape != (n, *shape):
            raise ValueError(
                f"modes has shape {tuple(modes.shape)}, expected {(n, *shape)} "
                "(one mode per image, in the backbone's latent shape)"
            )
        if not torch.isfinite(modes).all():
            raise ValueError("modes contain NaN or inf; re-run mode discovery on finite latents")
    bad = labels[(labels < 0) | (labels >= backbone.num_classes)]
    if bad.numel():
        raise ValueError(
            f"class label {int(bad[0])} is outside the backbone's classes [0, {backbone.num_classes})"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size} must be >= 1")

    schedule = respace_schedule(backbone.train_betas(), settings.steps)
    device, dtype = backbone.device, backbone.dtype
    out = torch.empty((n, *shape), dtype=torch.float32)
    n_batches = math.ceil(n / batch_size) if n else 0
    for b in range(n_batches):
        sl = range(b * batch_size, min(n, (b + 1) * batch_size))
        noise = _PerImageNoise([seeds[i] for i in sl], shape)
        x = _to_device(noise.draw(), device).float()
        y = labels[sl.start : sl.stop].to(device)
        m = modes[sl.start : sl.stop].to(device) if modes is not None else None
        for t in reversed(range(schedule.steps)):
            # Draw this step's noise on the CPU before queueing the denoiser, so that on a GPU the
            # copy overlaps with the forward pass instead of waiting for it (same draw order).
            z = _to_device(noise.draw(), device) if t > 0 else None
            eps, var = denoise_with_cfg(
                backbone, x.to(dtype), int(schedule.timesteps[t]), y, settings.cfg_scale,
                settings.cfg_channels,
            )
            eps = eps.float()
            var = var.float() if var is not None else None
            guided = m is not None and settings.guided_at(t)
            strength = settings.strength_at(t) if guided else 0.0
            if settings.kind == "ddpm":
                step = guided_ddpm_step(
                    x, eps, t, schedule, noise=z, mode=m if guided else None,
                    guidance_strength=strength, variance_values=var,
                )
            else:
                step = guided_ddim_step(
                    x, eps, t, schedule, noise=z, mode=m if guided else None,
                    guidance_strength=strength,
                )
            if callback is not None:
                callback(StepInfo(b, n_batches, t, schedule.steps, guided, x, step.pred_original_sample,
                                  step.prev_sample, sl))
            x = step.prev_sample
        out[sl.start : sl.stop] = x.float().cpu()
    return SampleResult(latents=out, settings=settings, seeds=[int(s) for s in seeds])
