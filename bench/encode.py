"""Latent-store encoding: throughput, peak RSS vs class size, time outside the VAE forward.

Issue 7 part 3 (and the encode figures of issue 2). Encodes one class of
``SyntheticSource`` images (32 x 32 x 1, the embedded default's geometry) with
the pipeline's embedded VAE (``EmbeddedVAEConfig`` in mgd3_core/config.py, built by
``mgd3_core.backbones.embedded_training.build_vae``, random weights: throughput
does not depend on them), posterior mean x scaling factor as ``DiffusersBackbone.encode``
through ``mgd3_core.latent_writer.encode_class`` exactly as the pipeline does, at
``EncodeConfig``'s batch and chunk sizes.

Each class size runs in a fresh subprocess so that ``ru_maxrss`` is the peak of
that run alone. Targets:

- peak RSS of 20,000 images / peak RSS of 2,000 images <= 1.2 (memory is set by
  the batch, not the class);
- share of the encode wall time spent outside the VAE forward (loading and
  converting images, HDF5 writes and fsyncs, hashing) <= 10 %.

    .venv/bin/python bench/encode.py                  # 2,000 and 20,000 images, ~4-6 min on 2 cores
    .venv/bin/python bench/encode.py --sizes 500 5000 # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    current_rss_mib, header, markdown_table, median, peak_rss_mib, set_threads,
)


def _vae(image_size: int, channels: int):
    from mgd3_core.config import EmbeddedVAEConfig

    from mgd3_core.backbones.embedded_training import build_vae

    cfg = EmbeddedVAEConfig()
    vae = build_vae(cfg, channels, image_size).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in vae.encoder.parameters()) + sum(p.numel() for p in vae.quant_conv.parameters())
    desc = (f"AutoencoderKL block_out_channels {list(cfg.block_out_channels)}, latent_channels "
            f"{cfg.latent_channels}, layers_per_block {cfg.layers_per_block}; encoder {n_params / 1e6:.2f} M params, "
            "random weights")
    return vae, desc


def child_main(args) -> None:
    """Encode ``args.n`` synthetic images into a temporary store; print one JSON line."""
    from mgd3_core.data import SyntheticSource
    from mgd3_core.latent_writer import encode_class

    threads = set_threads(args.threads)
    torch.manual_seed(0)
    vae, _ = _vae(args.image_size, 1)
    sf = float(vae.config.scaling_factor)
    src = SyntheticSource(args.n, image_size=args.image_size)
    timers = {"forward": 0.0, "load": 0.0, "batches": 0}

    def encode(x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        z = vae.encode(x).latent_dist.mean * sf
        timers["forward"] += time.perf_counter() - t0
        timers["batches"] += 1
        return z

    load = src.load

    def timed_load(class_id, split, ids):
        t0 = time.perf_counter()
        out = load(class_id, split, ids)
        timers["load"] += time.perf_counter() - t0
        return out

    src.load = timed_load
    # Forward-only throughput on one full batch (after a warm-up call), for reference.
    x = torch.from_numpy(src.load("0", "train", src.items("0", "train")[: args.batch_size])).float() / 127.5 - 1
    reps = []
    with torch.inference_mode():
        vae.encode(x)
        for _ in range(args.forward_reps):
            t0 = time.perf_counter()
            vae.encode(x)
            reps.append(time.perf_counter() - t0)
    timers.update(forward=0.0, load=0.0, batches=0)
    rss_before = current_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "0.h5"
        t0 = time.perf_counter()
        info = encode_class(src, "0", "train", encode, path, vae_fingerprint="bench", scaling_factor=sf,
                            batch_size=args.batch_size, chunk_size=args.chunk_size)
        wall = time.perf_counter() - t0
        size_mib = path.stat().st_size / 2**20
    print(json.dumps({
        "n": info.n, "threads": threads, "wall": wall, "forward": timers["forward"], "load": timers["load"],
        "batches": timers["batches"], "forward_only_batch_s": median(reps), "rss_before_mib": rss_before,
        "peak_rss_mib": peak_rss_mib(), "store_mib": size_mib, "shape": list(info.shape),
    }))


def run_child(args, n: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--n", str(n), "--batch-size", str(args.batch_size),
           "--chunk-size", str(args.chunk_size), "--image-size", str(args.image_size),
           "--forward-reps", str(args.forward_reps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"child for n={n} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    from mgd3_core.config import EncodeConfig

    enc = EncodeConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000], help="images per run (one subprocess each)")
    p.add_argument("--batch-size", type=int, default=enc.batch_size, help="EncodeConfig.batch_size")
    p.add_argument("--chunk-size", type=int, default=enc.chunk_size, help="EncodeConfig.chunk_size")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--forward-reps", type=int, default=5, help="timed forward-only calls per run")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args)
        return

    threads = set_threads(args.threads)
    print(header(threads, extra=f"batch {args.batch_size}, chunk {args.chunk_size}, float32 store"))
    print(f"model: {_vae(args.image_size, 1)[1]}")
    print(f"data: SyntheticSource, {args.image_size}x{args.image_size}x1 uint8, one class; each size in a fresh subprocess")
    print()
    runs = [run_child(args, n) for n in args.sizes]
    rows = []
    for r in runs:
        other = r["wall"] - r["forward"] - r["load"]
        rows.append([
            f"{r['n']:,}", f"{r['wall']:.1f}", f"{r['n'] / r['wall']:.0f}",
            f"{args.batch_size / r['forward_only_batch_s']:.0f}",
            f"{100 * (r['wall'] - r['forward']) / r['wall']:.1f} %",
            f"{100 * r['load'] / r['wall']:.1f} % / {100 * other / r['wall']:.1f} %",
            f"{r['rss_before_mib']:.0f}", f"{r['peak_rss_mib']:.0f}",
            f"{r['peak_rss_mib'] - r['rss_before_mib']:.0f}", f"{r['store_mib']:.1f}",
        ])
    print(markdown_table(
        ["images", "encode wall s", "images/s (end to end)", "images/s (VAE forward only)",
         "time outside VAE forward", "of which load / HDF5+other", "RSS before encode MiB",
         "peak RSS MiB", "peak - before MiB", "store MiB"],
        rows,
    ))
    print()
    small, large = runs[0], runs[-1]
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    worst_outside = max((r["wall"] - r["forward"]) / r["wall"] for r in runs)
    print(markdown_table(["check", "value", "target", ""], [
        [f"peak RSS {large['n']:,} / {small['n']:,} images", f"{ratio:.3f}", "<= 1.2",
         "met" if ratio <= 1.2 else "MISSED"],
        [f"peak RSS growth above pre-encode RSS, {large['n']:,} vs {small['n']:,}",
         f"{large['peak_rss_mib'] - large['rss_before_mib']:.0f} vs "
         f"{small['peak_rss_mib'] - small['rss_before_mib']:.0f} MiB", "", ""],
        ["time outside the VAE forward (worst run)", f"{100 * worst_outside:.1f} %", "<= 10 %",
         "met" if worst_outside <= 0.10 else "MISSED"],
    ]))


if __name__ == "__main__":
    main()
