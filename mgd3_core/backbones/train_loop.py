"""A resumable, deterministic training loop (used for the embedded VAE and DiT).

Determinism: every random draw of a run (batch indices, noise, timesteps,
label dropout, posterior samples) comes from one ``torch.Generator`` seeded
from the run's seed; model initialisation uses its own seeded RNG.

Resume: a checkpoint holds the model, the optimizer (AdamW moments and step
counts), the EMA weights, the generator state and the step, in one
safetensors file (tensors + JSON metadata: nothing is unpickled). It is written
to a temporary name and renamed, so an interruption leaves the previous
checkpoint intact. Resuming from it gives bit-identical weights to an
uninterrupted run: by construction, because the loop runs under
:func:`deterministic_training` (a fixed thread count, deterministic algorithms)
and the restored tensors are copied into freshly allocated memory, so every
kernel sees the same thread split, CPU capability and alignment as in an
uninterrupted run. Another thread count or CPU capability gives other last bits,
which is why both are part of the embedded backbone's key.
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..progress import TrainingProgress

log = logging.getLogger(__name__)

# (model, generator) -> (loss, metrics); draws every random number from the generator.
LossFn = Callable[[nn.Module, torch.Generator], tuple[torch.Tensor, dict]]


@dataclass(frozen=True)
class LoopSettings:
    """steps: optimizer steps; lr: peak AdamW learning rate, reached after
    ``warmup_steps`` of linear warm-up and decayed to ``final_lr_fraction`` x lr
    along a cosine; ema_decay 0 keeps no EMA; grad_clip: max global grad norm."""

    steps: int
    lr: float
    warmup_steps: int = 0
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    ema_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 250


def lr_at(step: int, s: LoopSettings) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    span = max(s.steps - s.warmup_steps, 1)
    progress = min((step - s.warmup_steps) / span, 1.0)
    return s.lr * (s.final_lr_fraction + (1 - s.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay after ``step`` updates, ramped up so early weights fade fast
    (the usual (1 + n) / (10 + n) warm-up): matters for short CPU runs."""
    return min(decay, (1 + step) / (10 + step))


# --------------------------------------------------------------------------- checkpoints
def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    sd = opt.state_dict()
    tensors = {
        f"opt/{idx}/{name}": value.detach().clone().contiguous()
        for idx, state in sd["state"].items()
        for name, value in state.items()
    }
    return tensors, json.dumps(sd["param_groups"])


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups: str) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": json.loads(param_groups)}


def save_checkpoint(
    path: Path, *, key: str, step: int, model: nn.Module, opt: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor] | None, generator: torch.Generator,
) -> None:
    """Write model + optimizer + EMA + RNG state atomically (temp file, then rename)."""
    tensors = {f"model/{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema/{k}": v.clone().contiguous() for k, v in ema.items()})
    opt_tensors, groups = _flatten_optimizer(opt)
    tensors.update(opt_tensors)
    tensors["rng"] = generator.get_state().clone()
    meta = {"key": key, "step": str(step), "param_groups": groups, "has_ema": str(ema is not None)}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_checkpoint(
    path: Path, *, key: str, model: nn.Module, opt: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor] | None, generator: torch.Generator,
) -> int | None:
    """Restore a checkpoint written by ``save_checkpoint`` for the same ``key``;
    returns its step, or None when there is no usable checkpoint (missing,
    unreadable, or written for other settings)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key or meta.get("has_ema") != str(ema is not None):
                return None
            # clone(): torch-allocated (aligned) copies, as the uninterrupted run's tensors are.
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except Exception as e:  # a truncated or foreign file: start over rather than fail
        log.warning("%s: unreadable checkpoint (%s); training this stage from the start", path, e)
        return None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
    if ema is not None:
        for k in ema:
            ema[k].copy_(tensors[f"ema/{k}"])
    opt.load_state_dict(_unflatten_optimizer(
        {k: v for k, v in tensors.items() if k.startswith("opt/")}, meta["param_groups"]
    ))
    generator.set_state(tensors["rng"])
    return int(meta["step"])


# --------------------------------------------------------------------------- the loop
@contextmanager
def deterministic_training(threads: int):
    """Run the block with ``threads`` torch intra-op threads and deterministic
    algorithms, then restore the caller's settings. With the thread count fixed
    (and the CPU capability fixed by the machine), a resumed training reproduces
    the uninterrupted one bit for bit, whatever thread count the caller uses."""
    before_threads = torch.get_num_threads()
    before_det = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before_det, warn_only=before_warn)
        torch.set_num_threads(before_threads)


def train_loop(
    model: nn.Module,
    loss_fn: LossFn,
    settings: LoopSettings,
    *,
    seed: int,
    stage: str,
    checkpoint: Path,
    key: str,
    progress: TrainingProgress | None = None,
) -> dict[str, torch.Tensor] | None:
    """Train ``model`` in place for ``settings.steps`` AdamW steps, resuming from
    ``checkpoint`` when it holds a state for ``key``.

    Every ``checkpoint_every`` steps the state is saved *before* ``progress``
    is called, so an exception raised by ``progress`` (or a kill) loses at most
    the steps since the last checkpoint. Returns the EMA weights (None when
    ``ema_decay`` is 0). The checkpoint file is left for the caller to delete.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.999), weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    ema = (
        {k: v.detach().clone() for k, v in model.state_dict().items()} if settings.ema_decay > 0 else None
    )
    step = load_checkpoint(checkpoint, key=key, model=model, opt=opt, ema=ema, generator=generator) or 0
    model.train()
    while step < settings.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        loss, metrics = loss_fn(model, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        opt.step()
        step += 1
        if ema is not None:
            d = ema_decay_at(step, settings.ema_decay)
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].mul_(d).add_(v, alpha=1 - d)
                    else:
                        ema[k].copy_(v)
        if step % settings.checkpoint_every == 0 and step < settings.steps:
            save_checkpoint(checkpoint, key=key, step=step, model=model, opt=opt, ema=ema, generator=generator)
        if progress is not None:
            progress(stage, step, settings.steps, {
                "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"],
                "grad_norm": float(grad_norm), **metrics,
            })
    model.eval()
    return ema
