"""Helpers shared by the benchmark scripts in bench/ (not part of mgd3_core).

- ``header``: the exact command, date, machine and thread count, printed first.
- ``markdown_table``: the table every script prints (and may write to a file).
- ``random_weights_backbone`` / ``embedded_backbone``: the pipeline's own
  ``DiffusersBackbone`` and model builders with random weights (throughput does
  not depend on the weights, and nothing is downloaded): no model code here.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python bench/x.py` from a clean clone
    sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- reporting
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line() -> str:
    exe = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    return " ".join([exe, script, *map(shlex.quote, sys.argv[1:])])


def header(threads: int, device: str = "cpu", extra: str = "") -> str:
    """The lines every script prints first: command, date, machine, threads."""
    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    load = ""
    with contextlib.suppress(OSError):
        load = " | load avg " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    lines = [
        f"$ {command_line()}",
        f"date {_dt.datetime.now().astimezone().isoformat(timespec='seconds')} | "
        f"nproc {os.cpu_count()} | CPU {cpu_model()} | device {dev}{load}",
        f"torch {torch.__version__} | torch threads {threads}" + (f" | {extra}" if extra else ""),
    ]
    return "\n".join(lines)


def set_threads(n: int | None) -> int:
    """Use ``n`` intra-op threads (default: every core) everywhere, and report it."""
    n = int(n or os.cpu_count() or 1)
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)  # for subprocesses and OpenMP users (scikit-learn)
    return n


def markdown_table(header_row: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header_row]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header_row))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(cells[0]), sep, *map(fmt, cells[1:])])


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


from mgd3_core.peak_memory import current_rss_mib, reset_peak_rss, window_peak_rss_mib  # noqa: E402,F401  (one home)


class Stopwatch:
    """Wall time of a block; synchronizes CUDA so GPU work is inside the interval."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        if self.cuda:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._t0


# --------------------------------------------------------------------------- models
def dit_train_betas() -> torch.Tensor:
    """DiT's training schedule (linear betas 1e-4 .. 0.02 over 1000 steps), from the core."""
    from mgd3_core.backbones.schedule import DIT_DEFAULT_SCHEDULE, betas_from_scheduler_config

    return betas_from_scheduler_config(DIT_DEFAULT_SCHEDULE, "DiT's default schedule")


def random_weights_backbone(transformer, vae, betas: torch.Tensor, *, device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32, autocast: torch.dtype | None = None):
    """The pipeline's ``DiffusersBackbone`` around models with random weights (throughput does
    not depend on them). ``autocast``: the backbone runs its models under torch.autocast.
    Returns (backbone, a description of it)."""
    from mgd3_core.backbones import DiffusersBackbone

    bb = DiffusersBackbone(transformer, vae, betas, fingerprint="random-weights",
                           vae_fingerprint="random-weights-vae", device=device, dtype=dtype, autocast=autocast)
    return bb, "mgd3_core DiffusersBackbone" + (f" under torch.autocast({autocast})" if autocast else "")


def randomize_zero_init_(model: torch.nn.Module, std: float = 0.02) -> None:
    """adaLN-Zero starts with zero modulation and output layers (every block is the
    identity); give those tensors small random values so the activations look like a
    trained model's (same FLOPs either way; avoids an all-zero output)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def embedded_backbone(device: str = "cpu", num_classes: int = 10):
    """The embedded default's backbone *architecture* with random weights, built by the
    pipeline's own builders (``mgd3_core.backbones.embedded_training``) at the sizes of
    ``mgd3_core.config`` at run time, so a retuned default is measured as is.
    Returns (backbone, description)."""
    from mgd3_core.backbones.embedded_training import build_dit, build_scheduler, build_vae
    from mgd3_core.backbones.schedule import betas_from_scheduler_config
    from mgd3_core.config import DatasetConfig, EmbeddedDiTConfig, EmbeddedVAEConfig

    dit, vae_cfg, data = EmbeddedDiTConfig(), EmbeddedVAEConfig(), DatasetConfig()
    factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
    transformer = build_dit(dit, vae_cfg.latent_channels, data.image_size // factor, num_classes)
    vae = build_vae(vae_cfg, data.channels, data.image_size)
    betas = betas_from_scheduler_config(dict(build_scheduler(dit).config), "embedded scheduler")
    randomize_zero_init_(transformer)
    bb, wrapper = random_weights_backbone(transformer, vae, betas, device=device)
    n_params = sum(p.numel() for p in transformer.parameters())
    desc = (
        f"embedded DiT {dit.num_layers} layers x {dit.num_attention_heads} heads x "
        f"{dit.attention_head_dim} (hidden {dit.num_attention_heads * dit.attention_head_dim}), "
        f"patch {dit.patch_size}, {n_params / 1e6:.2f} M params, random weights; "
        f"{data.image_size}x{data.image_size}x{data.channels} images -> latent "
        f"{tuple(bb.latent_shape)} (VAE factor {factor}); learned sigma {bb.learned_variance}; "
        f"{num_classes} classes; built by mgd3_core.backbones.embedded_training; backbone {wrapper}"
    )
    return bb, desc
