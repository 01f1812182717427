"""Guided sampling throughput of DiT-XL/2 + SD-VAE with random weights (issue 7, part 2).

Builds the ``facebook/DiT-XL-2-256`` architecture (diffusers
``DiTTransformer2DModel``: 28 layers, 16 heads x 72 = 1152 hidden, patch 2,
4 -> 8 channels (learned sigma), 32 x 32 latents, 1000 classes) and the SD-VAE
architecture (``AutoencoderKL``, blocks 128/256/512/512, 4 latent channels,
scaling 0.18215) with random weights -- throughput does not depend on the
weights, and nothing is downloaded. Then, for each dtype and batch size, runs
``mgd3_core.sampling.sample`` (DDPM, ``--steps`` 50, CFG ``--cfg`` 4, mode
guidance lambda 0.1 until t_stop 25, per-image seeds) on one batch and reports:

- images/s guided and unguided, and their wall-time ratio (target <= 1.05);
- speed-up over batch 1 (target: batched >= 10x batch 1);
- achieved TFLOP/s and the fraction of the FLOP bound (target bf16 >= 40 % on an
  H100). FLOPs are *counted* (torch.utils.flop_counter on a meta-device copy of
  the model, attention included; 2 FLOPs per multiply-add), not assumed: one
  DiT-XL/2 forward is 237 GFLOP per sample (the "118.6 GFLOPs" of the DiT paper
  are multiply-adds), so a 50-step CFG image is 23.7 TFLOP;
- peak GPU memory (torch.cuda.max_memory_allocated; on CPU the RSS high-water mark);
- VAE decode time per image.

dtypes: ``fp32`` (TF32 matmuls off unless ``--tf32``), ``bf16`` (torch.autocast,
fp32 weights and sampler state), ``bf16w`` (weights cast to bf16, no autocast).
Attention (``--attention``): ``sdpa`` = torch's scaled_dot_product_attention
(diffusers' AttnProcessor2_0: flash / memory-efficient kernels), ``math`` =
diffusers' classic AttnProcessor (explicit softmax(QK^T)V, the full attention
matrix in memory). ``--compile off,on`` runs every cell without and with
torch.compile of the transformer. Every combination is one row.

    .venv/bin/python bench/gpu_dit.py                          # on a CUDA machine
    .venv/bin/python bench/gpu_dit.py --compile off,on --attention sdpa,math --out dit.md
    .venv/bin/python bench/gpu_dit.py --tiny --device cpu      # 2-layer model on CPU: checks it works

With no ``--device`` and no CUDA device the script runs ``--tiny`` on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Stopwatch, dit_train_betas, header, markdown_table, median, random_weights_backbone, randomize_zero_init_,
    reset_peak_rss, set_threads, window_peak_rss_mib,
)

import torch  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

import mgd3_core.sampling as sampling  # noqa: E402

XL = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, learned_sigma=True,
          sample_size=32, patch_size=2, num_classes=1000)
SD_VAE = dict(image_channels=3, block_out_channels=[128, 256, 512, 512], latent_channels=4,
              layers_per_block=2, image_size=256, scaling_factor=0.18215)
TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=32, in_channels=4, learned_sigma=True,
            sample_size=8, patch_size=2, num_classes=1000)
TINY_VAE = dict(image_channels=3, block_out_channels=[32, 32, 32, 32], latent_channels=4,
                layers_per_block=1, image_size=64, scaling_factor=0.18215)


def build_dit(*, num_layers: int, num_attention_heads: int, attention_head_dim: int, in_channels: int,
              learned_sigma: bool, sample_size: int, patch_size: int, num_classes: int):
    """A DiT of this architecture, built by the pipeline's builder."""
    from mgd3_core.backbones.embedded_training import build_dit as core_build_dit
    from mgd3_core.config import EmbeddedDiTConfig

    arch = EmbeddedDiTConfig(num_layers=num_layers, num_attention_heads=num_attention_heads,
                             attention_head_dim=attention_head_dim, patch_size=patch_size)
    model = core_build_dit(arch, in_channels, sample_size, num_classes, learned_sigma=learned_sigma)
    return model.eval().requires_grad_(False)


def build_vae(*, image_channels: int, block_out_channels: list[int], latent_channels: int,
              layers_per_block: int, image_size: int, scaling_factor: float):
    """SD-VAE's architecture (mid-block attention on), built by the pipeline's builder."""
    from mgd3_core.backbones.embedded_training import build_vae as core_build_vae
    from mgd3_core.config import EmbeddedVAEConfig

    arch = EmbeddedVAEConfig(block_out_channels=block_out_channels, latent_channels=latent_channels,
                             layers_per_block=layers_per_block)
    vae = core_build_vae(arch, image_channels, image_size, mid_block_attention=True)
    vae.register_to_config(scaling_factor=scaling_factor)
    return vae.eval().requires_grad_(False)


DTYPES = {"fp32": (torch.float32, None), "bf16": (torch.float32, torch.bfloat16),
          "bf16w": (torch.bfloat16, None)}


# --------------------------------------------------------------------------- FLOPs
def si(x: float, unit: str) -> str:
    """1.23e12 -> '1.23 T<unit>' (engineering prefixes, so the tiny model reads too)."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def forward_flops_per_sample(dit_kwargs: dict) -> int:
    """FLOPs of one denoiser forward for one sample, counted on a meta-device copy
    (no memory, no device time; SDPA decomposes into counted matmuls there)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_dit(**dit_kwargs)
    c, s = dit_kwargs["in_channels"], dit_kwargs["sample_size"]
    x = torch.zeros(2, c, s, s, device="meta")
    t = torch.zeros(2, dtype=torch.long, device="meta")
    y = torch.tensor([0, dit_kwargs["num_classes"]], device="meta")
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x, timestep=t, class_labels=y)
    return counter.get_total_flops() // 2


# --------------------------------------------------------------------------- runs
def request(backbone, n: int):
    labels = [(7 * i) % backbone.num_classes for i in range(n)]
    seeds = [sampling.image_seed(0, str(c), n, i) for i, c in enumerate(labels)]
    modes = torch.randn((n, *backbone.latent_shape), generator=torch.Generator().manual_seed(0))
    return labels, seeds, modes


def settings(steps: int, cfg: float, guided: bool) -> sampling.SamplerSettings:
    return sampling.SamplerSettings(steps=steps, cfg_scale=cfg, guidance_strength=0.1 if guided else 0.0,
                                     t_stop=round(25 * steps / 50))


def run(backbone, n: int, batch: int, steps: int, cfg: float, guided: bool) -> float:
    labels, seeds, modes = request(backbone, n)
    with Stopwatch(backbone.device) as sw:
        sampling.sample(backbone, labels, seeds, modes=modes if guided else None,
                        settings=settings(steps, cfg, guided), batch_size=batch)
    return sw.seconds


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return window_peak_rss_mib() / 1024


def fits(backbone, batch: int, cfg: float) -> bool:
    """One batch of ``batch`` images for 2 steps without running out of memory."""
    try:
        run(backbone, batch, batch, 2, cfg, True)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def largest_batch(backbone, start: int, limit: int, cfg: float) -> int:
    """Double from ``start`` until out of memory (or ``limit``), then bisect to a multiple of 16."""
    ok, bad = start, None
    while ok * 2 <= limit:
        if fits(backbone, ok * 2, cfg):
            ok *= 2
        else:
            bad = ok * 2
            break
    if bad is None:
        return ok
    while bad - ok > 16:
        mid = (ok + bad) // 2 // 16 * 16
        if mid <= ok:
            break
        if fits(backbone, mid, cfg):
            ok = mid
        else:
            bad = mid
    return ok


def vae_decode(backbone, batch: int, repeats: int) -> tuple[float, float]:
    """(seconds per image, peak memory GiB) decoding ``batch`` latents at once."""
    z = torch.randn((batch, *backbone.latent_shape), device=backbone.device, dtype=backbone.dtype)
    with torch.inference_mode():
        backbone.decode(z)  # warm-up
        reset_peak(backbone.device)
        times = []
        for _ in range(repeats):
            with Stopwatch(backbone.device) as sw:
                backbone.decode(z)
            times.append(sw.seconds)
    return median(times) / batch, peak_mem_gib(backbone.device)


def set_attention(model, kind: str) -> None:
    """Every attention module of ``model`` on torch SDPA (``sdpa``) or the explicit ``math`` processor."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    cls = AttnProcessor2_0 if kind == "sdpa" else AttnProcessor
    for module in model.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(cls())


# --------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default="fp32,bf16w,bf16", help="comma list of fp32, bf16w (bf16 weights), "
                   "bf16 (autocast)")
    p.add_argument("--batches", default=None, help="comma list; 'max' = largest that fits "
                   "(default 1,16,64,128,256; --tiny 1,2,4)")
    p.add_argument("--attention", default="sdpa", help="comma list of sdpa, math (see the docstring)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 50; --tiny 4)")
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 64, 8x8 latents: a CPU smoke run")
    p.add_argument("--compile", nargs="?", const="on", default="off",
                   help="comma list of off, on (torch.compile the transformer); --compile alone = on")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode (default, reduce-overhead = CUDA graphs, max-autotune)")
    p.add_argument("--timed-steps", type=int, default=0,
                   help="time only this many steps per cell and scale to --steps (every step is the same "
                        "work: one CFG forward + O(latent) updates); 0 = all steps. Saves GPU time at big batches")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls in the fp32 runs")
    p.add_argument("--repeats", type=int, default=1, help="timed repetitions per cell (median)")
    p.add_argument("--batch1-images", type=int, default=None, help="images timed at batch 1 (default 4; --tiny 2)")
    p.add_argument("--max-batch", type=int, default=512, help="upper limit of the 'max' search")
    p.add_argument("--vae-batch", type=int, default=None, help="decode batch (default 16; --tiny 2)")
    p.add_argument("--peak-tflops", type=float, default=800.0,
                   help="bf16 FLOP/s bound, TFLOP/s (default 800 as in bench/RESULTS.md; H100 / H200 SXM dense: 989)")
    p.add_argument("--peak-tflops-fp32", type=float, default=None,
                   help="fp32 bound, TFLOP/s (default 67, H100 SXM non-tensor; 400 with --tf32)")
    p.add_argument("--no-unguided", action="store_true", help="skip the unguided runs (no ratio)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--out", type=Path, default=None, help="also write the output (markdown) to this file")
    args = p.parse_args()

    note = ""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu" and not args.tiny:
            args.tiny = True
            note = "no CUDA device and no --device given: running --tiny on the CPU"
    device = torch.device(args.device)
    tiny = args.tiny
    steps = args.steps or (4 if tiny else 50)
    batch_spec = args.batches or ("1,2,4" if tiny else "1,16,64,128,256")
    attentions = [a.strip() for a in args.attention.split(",") if a.strip()]
    compiles = [c.strip() == "on" for c in args.compile.split(",") if c.strip()]
    if not set(attentions) <= {"sdpa", "math"} or not compiles:
        p.error("--attention takes sdpa and/or math; --compile takes off and/or on")
    batch1_images = args.batch1_images or (2 if tiny else 4)
    vae_batch = args.vae_batch or (2 if tiny else 16)
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"--dtype {d!r}: choose from {', '.join(DTYPES)}")
    if "bf16" in "".join(dtypes) and device.type == "cpu":
        note += ("; " if note else "") + "bf16 on CPU: emulated/oneDNN speed, not meaningful"
    peak_fp32 = args.peak_tflops_fp32 or (400.0 if args.tf32 else 67.0)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    threads = set_threads(args.threads)
    diffusers_logging.set_verbosity_error()  # no "modules kept in float32" notices for random weights

    dit_kwargs, vae_kwargs = (TINY, TINY_VAE) if tiny else (XL, SD_VAE)
    out_lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        out_lines.append(line)

    emit("```")
    timed = args.timed_steps if 0 < args.timed_steps < steps else steps
    emit(header(threads, str(device), extra=f"compile {args.compile}"
                + (f" ({args.compile_mode})" if args.compile_mode else "") + f" | attention {args.attention}"
                + f" | tf32 {args.tf32}"))
    if note:
        emit(f"note: {note}")
    flops_fwd = forward_flops_per_sample(dit_kwargs)
    flops_img = flops_fwd * 2 * steps  # CFG doubles every step
    hidden = dit_kwargs["num_attention_heads"] * dit_kwargs["attention_head_dim"]
    emit(f"model: {'TINY ' if tiny else ''}DiT {dit_kwargs['num_layers']} layers x {dit_kwargs['num_attention_heads']} "
         f"heads x {dit_kwargs['attention_head_dim']} (hidden {hidden}), patch {dit_kwargs['patch_size']}, "
         f"latent {dit_kwargs['in_channels']}x{dit_kwargs['sample_size']}x{dit_kwargs['sample_size']}, "
         f"learned sigma, {dit_kwargs['num_classes']} classes, random weights; VAE blocks "
         f"{vae_kwargs['block_out_channels']} -> {vae_kwargs['image_size']} px")
    emit(f"FLOPs (counted): {si(flops_fwd, 'FLOP')} per sample per forward; x2 CFG x {steps} steps = "
         f"{si(flops_img, 'FLOP')} per image; bound bf16 {args.peak_tflops:.0f} TFLOP/s = "
         f"{args.peak_tflops * 1e12 / flops_img:.1f} images/s, fp32 {peak_fp32:.0f} TFLOP/s = "
         f"{peak_fp32 * 1e12 / flops_img:.1f} images/s")
    if tiny:
        xl = forward_flops_per_sample(XL)
        emit(f"(for reference, DiT-XL/2 counted the same way: {xl / 1e9:.1f} GFLOP per sample per forward, "
             f"{xl * 2 * 50 / 1e12:.2f} TFLOP per 50-step CFG image, bound at 800 TFLOP/s "
             f"{800e12 / (xl * 100):.1f} images/s)")
    emit(f"sampler: DDPM {steps} steps, CFG {args.cfg}, guided lambda 0.1 t_stop {round(25 * steps / 50)} vs "
         f"unguided lambda 0; one batch per cell (batch 1: {batch1_images} images); repeats {args.repeats}")
    if timed != steps:
        emit(f"timing: each cell samples {timed} steps (t_stop {round(25 * timed / 50)}: the same guided share) "
             f"and images/s is scaled to {steps} steps")
    emit("```")
    emit()

    base_transformer = build_dit(**dit_kwargs)
    randomize_zero_init_(base_transformer)  # adaLN-Zero: avoid an all-zero denoiser output
    base_vae = build_vae(**vae_kwargs)
    rows, vae_rows = [], []
    for dname, attention, compiled in [(d, a, c) for d in dtypes for a in attentions for c in compiles]:
        weight_dtype, amp = DTYPES[dname]
        set_attention(base_transformer, attention)
        backbone, wrapper = random_weights_backbone(base_transformer, base_vae, dit_train_betas(), device=device,
                                                    dtype=weight_dtype, autocast=amp)
        if compiled:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            backbone.transformer = torch.compile(backbone.transformer, mode=args.compile_mode)
        dname = f"{dname} {attention}{' compiled' if compiled else ''}"
        emit(f"({dname}: backbone {wrapper})")
        peak = args.peak_tflops if dname.startswith("bf16") else peak_fp32
        if device.type == "cuda":
            torch.cuda.empty_cache()

        batches: list[int] = []
        for b in batch_spec.split(","):
            b = b.strip()
            if b == "max":
                if device.type != "cuda":
                    emit(f"({dname}: 'max' batch search needs a CUDA device; skipped)")
                    continue
                start = max([x for x in batches] + [1])
                t0 = time.perf_counter()
                mb = largest_batch(backbone, start, args.max_batch, args.cfg)
                emit(f"({dname}: largest batch that fits, searched up to {args.max_batch}: {mb}, "
                     f"{time.perf_counter() - t0:.0f} s)")
                if mb not in batches:
                    batches.append(mb)
            elif b:
                batches.append(int(b))

        per_image_1 = None
        for b in batches:
            n = batch1_images if b == 1 else b
            t0 = time.perf_counter()
            try:
                run(backbone, b, b, 2, args.cfg, True)  # warm-up (and compilation for this shape)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append([dname, b, "OOM"] + ["-"] * 8)
                continue
            except RuntimeError as err:  # e.g. math attention's full matrix beyond the device
                if "out of memory" not in str(err).lower():
                    raise
                torch.cuda.empty_cache()
                rows.append([dname, b, "OOM"] + ["-"] * 8)
                continue
            warm = time.perf_counter() - t0
            g_times, u_times = [], []
            reset_peak(device)
            for r in range(args.repeats):
                pair = [True, False] if r % 2 == 0 else [False, True]
                for guided in pair:
                    if not guided and args.no_unguided:
                        continue
                    secs = run(backbone, n, b, timed, args.cfg, guided) * steps / timed
                    (g_times if guided else u_times).append(secs)
            mem = peak_mem_gib(device)
            g = median(g_times)
            ips = n / g
            if b == 1:
                per_image_1 = ips
            ratio = median([x / y for x, y in zip(g_times, u_times)]) if u_times else float("nan")
            achieved = ips * flops_img / 1e12
            rows.append([
                dname, b, n, f"{ips:.2f}", f"{n / median(u_times):.2f}" if u_times else "-",
                f"{ratio:.3f}" if u_times else "-",
                f"{ips / per_image_1:.1f}x" if per_image_1 else "-",
                si(achieved * 1e12, "FLOP/s"), f"{100 * achieved / peak:.2g} %", f"{mem:.2f}", f"{warm:.1f}",
            ])
            print(f"  {' | '.join(map(str, rows[-1]))}", file=sys.stderr, flush=True)
        if attention == attentions[0] and compiled == compiles[0]:  # the VAE does not depend on either
            sec_img, vmem = vae_decode(backbone, vae_batch, max(args.repeats, 1))
            vae_rows.append([dname.split()[0], vae_batch, f"{1000 * sec_img:.2f}", f"{1 / sec_img:.1f}",
                             f"{vmem:.2f}"])
        del backbone
        if device.type == "cuda":
            torch.cuda.empty_cache()

    mem_name = "peak GPU mem GiB" if device.type == "cuda" else "peak RSS GiB"
    emit(markdown_table(
        ["dtype", "batch", "images", "guided img/s", "unguided img/s", "guided/unguided time",
         "vs batch 1", "achieved", "of bound", mem_name, "warm-up s"], rows))
    emit()
    emit(markdown_table(["dtype", "VAE decode batch", "ms / image", "images/s", mem_name], vae_rows))
    emit()
    emit("targets: guided/unguided time <= 1.05; batched >= 10x batch 1; bf16 >= 40 % of the bound on an H100 / H200")
    if args.out:
        args.out.write_text("\n".join(out_lines) + "\n")


if __name__ == "__main__":
    main()
