"""Helpers shared by the benchmark scripts in bench/ (not part of mgd3_core).

- ``header``: the exact command, date, machine and thread count, printed first.
- ``markdown_table``: the table every script prints (and may write to a file).
- ``RandomDiTBackbone``: a ``Backbone`` (mgd3_core/backbones/base.py) around a
  diffusers ``DiTTransformer2DModel`` + ``AutoencoderKL`` with random weights;
  throughput does not depend on the weights, and nothing is downloaded.
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


def _status_mib(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def current_rss_mib() -> float:
    return _status_mib("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) so a later ``window_peak_rss_mib``
    sees only what follows; Linux >= 4.0. Returns False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def window_peak_rss_mib() -> float:
    """VmHWM: the peak RSS since the last ``reset_peak_rss`` (or process start)."""
    return _status_mib("VmHWM")


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
def linear_train_betas(T: int = 1000) -> torch.Tensor:
    """DiT's training schedule: linear betas 1e-4 .. 0.02 over T steps."""
    return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)


def build_dit(
    *, num_layers: int, num_attention_heads: int, attention_head_dim: int, in_channels: int,
    learned_sigma: bool, sample_size: int, patch_size: int, num_classes: int,
):
    from diffusers import DiTTransformer2DModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = DiTTransformer2DModel(
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=in_channels,
        out_channels=2 * in_channels if learned_sigma else in_channels,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes,
    )
    for module in model.modules():  # torch SDPA attention (diffusers' default processor)
        if hasattr(module, "set_processor") and not isinstance(module.processor, AttnProcessor2_0):
            module.set_processor(AttnProcessor2_0())
    return model.eval().requires_grad_(False)


def build_vae(*, image_channels: int, block_out_channels: Sequence[int], latent_channels: int,
              layers_per_block: int, image_size: int, scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    groups = min(32, min(block_out_channels))
    vae = AutoencoderKL(
        in_channels=image_channels,
        out_channels=image_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=groups,
        sample_size=image_size,
        scaling_factor=scaling_factor,
    )
    return vae.eval().requires_grad_(False)


class RandomDiTBackbone:
    """The ``Backbone`` protocol over a diffusers DiT + VAE (random weights allowed).

    ``autocast``: run the denoiser and the VAE under ``torch.autocast`` with this
    dtype (bf16 on GPUs) while the sampler keeps its state in float32.
    """

    fingerprint = "random-weights"
    vae_fingerprint = "random-weights-vae"

    def __init__(self, transformer, vae, *, num_classes: int, image_size: int, image_channels: int,
                 device: str | torch.device = "cpu", autocast: torch.dtype | None = None,
                 train_steps: int = 1000):
        self.device = torch.device(device)
        self.transformer = transformer.to(self.device)
        self.vae = vae.to(self.device) if vae is not None else None
        self.num_classes = num_classes
        self.null_class = num_classes  # diffusers' label table has the CFG row at index num_classes
        c = transformer.config.in_channels
        self.learned_variance = transformer.config.out_channels == 2 * c
        self.scaling_factor = float(vae.config.scaling_factor) if vae is not None else 1.0
        self.latent_shape = (c, transformer.config.sample_size, transformer.config.sample_size)
        self.image_size = image_size
        self.image_channels = image_channels
        self.dtype = torch.float32
        self.autocast = autocast
        self._betas = linear_train_betas(train_steps)

    def _amp(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def train_betas(self) -> torch.Tensor:
        return self._betas

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self._amp():
            return self.transformer(x_t, timestep=t, class_labels=labels).sample

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with self._amp():
            return self.vae.encode(images).latent_dist.mean * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self._amp():
            return self.vae.decode(latents / self.scaling_factor).sample.clamp(-1, 1)


def _randomize_zero_init_(model: torch.nn.Module, std: float = 0.02) -> None:
    """adaLN-Zero starts with zero modulation and output layers (every block is the
    identity); give those tensors small random values so the activations look like a
    trained model's (same FLOPs either way; avoids an all-zero output)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def wrap_backbone(transformer, vae, *, num_classes: int, image_size: int, image_channels: int,
                  betas: torch.Tensor, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, autocast: torch.dtype | None = None):
    """The project's ``DiffusersBackbone`` around these models when it is importable
    (what the pipeline runs), else ``RandomDiTBackbone``. ``autocast``: run the
    denoiser and the VAE decoder under torch.autocast with that dtype.
    Returns (backbone, name of the class used)."""
    try:
        from mgd3_core.backbones.diffusers_backbone import DiffusersBackbone
    except ImportError:
        bb = RandomDiTBackbone(transformer, vae, num_classes=num_classes, image_size=image_size,
                               image_channels=image_channels, device=device, autocast=autocast,
                               train_steps=betas.numel())
        bb._betas = betas
        if dtype != torch.float32:
            bb.transformer, bb.vae, bb.dtype = bb.transformer.to(dtype), bb.vae.to(dtype), dtype
        return bb, "bench/_common.py RandomDiTBackbone (mgd3_core.backbones.diffusers_backbone not found)"

    class AutocastBackbone(DiffusersBackbone):
        def denoise(self, x_t, t, labels):
            with torch.autocast(self.device.type, dtype=autocast):
                return super().denoise(x_t, t, labels)

        def decode(self, latents):
            with torch.autocast(self.device.type, dtype=autocast):
                return super().decode(latents)

    cls = DiffusersBackbone if autocast is None else AutocastBackbone
    bb = cls(transformer, vae, betas, fingerprint="random-weights", vae_fingerprint="random-weights-vae",
             device=device, dtype=dtype)
    return bb, "mgd3_core DiffusersBackbone" + (f" under torch.autocast({autocast})" if autocast else "")


def embedded_backbone(device: str = "cpu", num_classes: int = 10):
    """The embedded default's backbone *architecture* with random weights.

    Sizes come from mgd3_core.config at run time (``EmbeddedDiTConfig``,
    ``EmbeddedVAEConfig``, ``DatasetConfig``), so a retuned default is measured as
    is; the models are built by mgd3_core.backbones.embedded when it exists (the
    pipeline's own builders), else by the helpers above. Returns (backbone, description).
    """
    from mgd3_core.config import DatasetConfig, EmbeddedDiTConfig, EmbeddedVAEConfig

    dit, vae_cfg, data = EmbeddedDiTConfig(), EmbeddedVAEConfig(), DatasetConfig()
    factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
    latent = data.image_size // factor
    try:
        from mgd3_core.backbones import embedded as core
    except ImportError:
        core = None
    if core is not None:
        transformer = core.build_dit(dit, vae_cfg.latent_channels, latent, num_classes)
        vae = core.build_vae(vae_cfg, data.channels, data.image_size)
        from mgd3_core.backbones.diffusers_backbone import betas_from_scheduler_config

        betas = betas_from_scheduler_config(dict(core.build_scheduler(dit).config), "embedded scheduler")
        built_by = "mgd3_core.backbones.embedded.build_dit/build_vae"
    else:
        transformer = build_dit(
            num_layers=dit.num_layers, num_attention_heads=dit.num_attention_heads,
            attention_head_dim=dit.attention_head_dim, in_channels=vae_cfg.latent_channels,
            learned_sigma=False, sample_size=latent, patch_size=dit.patch_size, num_classes=num_classes,
        )
        vae = build_vae(
            image_channels=data.channels, block_out_channels=vae_cfg.block_out_channels,
            latent_channels=vae_cfg.latent_channels, layers_per_block=vae_cfg.layers_per_block,
            image_size=data.image_size,
        )
        betas = linear_train_betas(dit.num_train_timesteps)
        built_by = "bench/_common.py build_dit/build_vae"
    _randomize_zero_init_(transformer)
    bb, wrapper = wrap_backbone(transformer, vae, num_classes=num_classes, image_size=data.image_size,
                                image_channels=data.channels, betas=betas, device=device)
    n_params = sum(p.numel() for p in transformer.parameters())
    desc = (
        f"embedded DiT {dit.num_layers} layers x {dit.num_attention_heads} heads x "
        f"{dit.attention_head_dim} (hidden {dit.num_attention_heads * dit.attention_head_dim}), "
        f"patch {dit.patch_size}, {n_params / 1e6:.2f} M params, random weights; "
        f"{data.image_size}x{data.image_size}x{data.channels} images -> latent "
        f"{tuple(bb.latent_shape)} (VAE factor {factor}); learned sigma {bb.learned_variance}; "
        f"{num_classes} classes; built by {built_by}; backbone {wrapper}"
    )
    return bb, desc
