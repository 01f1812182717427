"""Sampling throughput on the embedded backbone (CPU): guided vs unguided, batched vs batch 1.

Issue 7, part 1. The embedded DiT architecture is built from the sizes in
mgd3_core/config.py with random weights (throughput does not depend on them)
and sampled with ``mgd3_core.sampling.sample`` exactly as the pipeline does:
DDPM respaced to ``--steps`` (50), CFG on (``SamplerConfig.cfg_scale``), per-image
seeds. Targets:

- guided (lambda 0.1, t_stop 25) / unguided (lambda 0) wall time <= 1.05 at the same batch;
- batched (``SamplerConfig.batch_size``) / batch-1 throughput >= 3x.

Runs are interleaved (guided, unguided, batch 1, in rotating order) and the
ratios are medians of ratios taken within one repetition. Each ratio is also
given in process CPU time, which load from other processes barely changes. The
time inside the denoiser and inside the per-image noise draws is measured by
wrapping them, so the sampler's own overhead -- and what guidance adds to it --
is visible even when wall times are noisy. Peak memory: one fresh subprocess
samples each configuration with the kernel's RSS high-water mark (VmHWM) reset
before it (torch allocations are invisible to tracemalloc).

    .venv/bin/python bench/sampling.py            # defaults, ~1-2 min on 2 quiet cores
    .venv/bin/python bench/sampling.py --quick    # one repetition, fewer batch-1 images
    .venv/bin/python bench/sampling.py --profile  # + torch.profiler top operators
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    current_rss_mib, embedded_backbone, header, markdown_table, median, peak_rss_mib, reset_peak_rss,
    set_threads, window_peak_rss_mib,
)

import torch  # noqa: E402

import mgd3_core.sampling as sampling  # noqa: E402
from mgd3_core.config import SamplerConfig  # noqa: E402


# --------------------------------------------------------------------------- instrumentation
class Timers:
    """Accumulated seconds inside the denoiser and inside the per-image noise draws."""

    def __init__(self):
        self.denoise = 0.0
        self.noise = 0.0

    def reset(self):
        self.denoise = self.noise = 0.0


def instrument(backbone, timers: Timers) -> None:
    inner = backbone.denoise

    def timed_denoise(x, t, y):
        t0 = time.perf_counter()
        out = inner(x, t, y)
        timers.denoise += time.perf_counter() - t0
        return out

    backbone.denoise = timed_denoise
    noise_cls = getattr(sampling, "_PerImageNoise", None)
    if noise_cls is not None and not getattr(noise_cls, "_bench_wrapped", False):
        for name in ("draw", "draw_all"):
            fn = getattr(noise_cls, name, None)
            if fn is None:
                continue

            def wrap(fn=fn):
                def timed(self, *a, **k):
                    t0 = time.perf_counter()
                    out = fn(self, *a, **k)
                    timers.noise += time.perf_counter() - t0
                    return out
                return timed

            setattr(noise_cls, name, wrap())
        noise_cls._bench_wrapped = True


# --------------------------------------------------------------------------- one run
def request(backbone, n: int, seed: int = 0):
    """n images spread over the classes, per-image seeds, random modes (N, C, h, w)."""
    labels = [i % backbone.num_classes for i in range(n)]
    seeds = [sampling.image_seed(seed, str(c), n, i) for i, c in enumerate(labels)]
    g = torch.Generator().manual_seed(seed)
    modes = torch.randn((n, *backbone.latent_shape), generator=g)
    return labels, seeds, modes


def settings_for(kind: str, steps: int) -> sampling.SamplerSettings:
    cfg = SamplerConfig()
    lam = 0.0 if kind == "unguided" else cfg.guidance_strength
    t_stop = round(cfg.t_stop * steps / cfg.steps)  # the same fraction of the steps when --steps differs
    return sampling.SamplerSettings(steps=steps, cfg_scale=cfg.cfg_scale, guidance_strength=lam,
                                     t_stop=t_stop, kind=cfg.kind)


def run_once(backbone, kind: str, n: int, batch: int, steps: int, timers: Timers) -> dict:
    labels, seeds, modes = request(backbone, n)
    timers.reset()
    t0, c0 = time.perf_counter(), time.process_time()
    out = sampling.sample(backbone, labels, seeds, modes=None if kind == "unguided" else modes,
                          settings=settings_for(kind, steps), batch_size=batch).latents
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if not torch.isfinite(out).all():
        print(f"warning: {kind} batch {batch}: non-finite latents (random weights)", file=sys.stderr)
    return {"wall": wall, "cpu": cpu, "denoise": timers.denoise, "noise": timers.noise, "n": n}


# --------------------------------------------------------------------------- memory child
MEMORY_RUNS = ("batch1", "unguided", "guided")  # smallest first: a run never sees a larger one's cache


def child_main(args) -> None:
    """Fresh process: build the model, then sample each configuration with the RSS
    high-water mark reset before it; print JSON {run: figures}."""
    threads = set_threads(args.threads)
    backbone, _ = embedded_backbone()
    timers = Timers()
    instrument(backbone, timers)
    rss_built = current_rss_mib()
    result = {}
    for run in MEMORY_RUNS:
        kind, n, batch = ("guided", args.batch1_images, 1) if run == "batch1" else (run, args.batch, args.batch)
        reset = reset_peak_rss()  # so the high-water mark is that of this run, not of the imports
        r = run_once(backbone, kind, n, batch, args.steps, timers)
        result[run] = {"threads": threads, "rss_after_build_mib": rss_built, "hwm_reset": reset,
                       "peak_rss_sampling_mib": window_peak_rss_mib() if reset else float("nan"),
                       "peak_rss_process_mib": peak_rss_mib(), **r}
    print(json.dumps(result))


def measure_memory(args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--batch", str(args.batch), "--batch1-images",
           str(args.batch1_images), "--steps", str(args.memory_steps), "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- profile
def profile(backbone, batch: int, steps: int) -> str:
    from torch.profiler import ProfilerActivity, profile as tprofile

    labels, seeds, modes = request(backbone, batch)
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        sampling.sample(backbone, labels, seeds, modes=modes, settings=settings_for("guided", steps),
                        batch_size=batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


# --------------------------------------------------------------------------- main
def main() -> None:
    cfg = SamplerConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=cfg.batch_size, help="batched run size (SamplerConfig.batch_size)")
    p.add_argument("--steps", type=int, default=cfg.steps)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (medians are reported)")
    p.add_argument("--batch1-images", type=int, default=4, help="images sampled one at a time per repetition")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators")
    p.add_argument("--quick", action="store_true", help="1 repetition, 2 batch-1 images")
    p.add_argument("--memory-steps", type=int, default=3,
                   help="steps in the peak-RSS subprocess (every step allocates the same; default 3)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args)
    if args.quick:
        args.repeats, args.batch1_images = 1, 2

    args.threads = set_threads(args.threads)
    backbone, desc = embedded_backbone()
    st = settings_for("guided", args.steps)
    print(header(args.threads, extra=f"interleaved repeats {args.repeats}"))
    print(f"model: {desc}")
    print(f"sampler: {st.kind}, {st.steps} steps, CFG {st.cfg_scale}, guided lambda {st.guidance_strength} "
          f"t_stop {st.t_stop} vs unguided lambda 0; batched = {args.batch} images in one batch, "
          f"batch 1 = {args.batch1_images} images one at a time")
    print()
    timers = Timers()
    instrument(backbone, timers)
    # Warm-up: first-call allocations and oneDNN kernel selection at both batch sizes.
    run_once(backbone, "guided", args.batch, args.batch, 2, timers)
    run_once(backbone, "guided", 1, 1, 2, timers)

    runs = {"guided": [], "unguided": [], "batch1": []}
    order = ["guided", "unguided", "batch1"]
    for r in range(args.repeats):
        for kind in order[r % 3:] + order[: r % 3]:  # rotate so no run always goes first
            if kind == "batch1":
                runs[kind].append(run_once(backbone, "guided", args.batch1_images, 1, args.steps, timers))
            else:
                runs[kind].append(run_once(backbone, kind, args.batch, args.batch, args.steps, timers))
            print(f"  rep {r + 1}/{args.repeats} {kind:8s} {runs[kind][-1]['wall']:.2f} s wall, "
                  f"{runs[kind][-1]['cpu']:.2f} s CPU", file=sys.stderr, flush=True)

    mem = {} if args.no_memory else measure_memory(args)

    names = {"guided": f"guided (lambda {st.guidance_strength}, t_stop {st.t_stop})",
             "unguided": "unguided (lambda 0)", "batch1": "guided, batch 1"}
    rows = []
    for kind, rs in runs.items():
        wall = median([x["wall"] for x in rs])
        n = rs[0]["n"]
        share = lambda key: f"{100 * median([x[key] / x['wall'] for x in rs]):.1f} %"
        other = f"{100 * median([(x['wall'] - x['denoise'] - x['noise']) / x['wall'] for x in rs]):.1f} %"
        m = mem.get(kind)
        rows.append([
            names[kind], 1 if kind == "batch1" else args.batch, n, f"{wall:.2f}",
            f"{median([x['cpu'] for x in rs]):.2f}", f"{n / wall:.2f}", f"{1000 * wall / n:.1f}", share("denoise"), share("noise"), other,
            f"{m['rss_after_build_mib']:.0f}" if m else "-",
            f"{m['peak_rss_sampling_mib']:.0f}" if m else "-",
            f"{m['peak_rss_sampling_mib'] - m['rss_after_build_mib']:+.0f}" if m else "-",
        ])
    print(markdown_table(
        ["run", "batch", "images", "median wall s", "median CPU s", "images/s", "ms/image", "in denoiser",
         "in noise draws", "rest of sampler", "RSS after build MiB", "peak RSS sampling MiB",
         "growth MiB"], rows))
    if mem:
        print(f"RSS: one fresh subprocess, {args.memory_steps} steps per row, rows run smallest first; "
              "'peak RSS sampling' is VmHWM after a reset (clear_refs) at the start of the row, "
              "'growth' = that peak minus the RSS after building the model (process peak incl. imports: "
              + ", ".join(f"{k} {v['peak_rss_process_mib']:.0f}" for k, v in mem.items()) + " MiB)")
    print()

    def paired(key, a, b, per_image=False):
        """Median over repetitions of a[key] / b[key] (per image if asked)."""
        f = (lambda x: x[key] / x["n"]) if per_image else (lambda x: x[key])
        return median([f(x) / f(y) for x, y in zip(runs[a], runs[b])])

    guided_vs_unguided = paired("wall", "guided", "unguided")
    of_medians = median([g["wall"] for g in runs["guided"]]) / median([u["wall"] for u in runs["unguided"]])
    cpu_ratio = paired("cpu", "guided", "unguided")
    speedup = paired("wall", "batch1", "guided", per_image=True)
    speedup_cpu = paired("cpu", "batch1", "guided", per_image=True)
    denoise_ratio = median([g["denoise"] / u["denoise"] for g, u in zip(runs["guided"], runs["unguided"])])
    loop_g = median([g["wall"] - g["denoise"] for g in runs["guided"]])
    loop_u = median([u["wall"] - u["denoise"] for u in runs["unguided"]])
    # What guidance itself adds: the sampler time outside the (identical) denoiser calls.
    attributable = 1.0 + (loop_g - loop_u) / median([u["wall"] for u in runs["unguided"]])
    ok = lambda c: "met" if c else "MISSED"
    print(markdown_table(["ratio (median of per-repetition ratios)", "value", "target", ""], [
        ["guided / unguided wall time", f"{guided_vs_unguided:.3f}", "<= 1.05", ok(guided_vs_unguided <= 1.05)],
        ["  same, ratio of the medians", f"{of_medians:.3f}", "<= 1.05", ok(of_medians <= 1.05)],
        ["  same, process CPU time (robust to other load)", f"{cpu_ratio:.3f}", "<= 1.05", ok(cpu_ratio <= 1.05)],
        ["  same, denoiser time only", f"{denoise_ratio:.3f}", "(reference)", ""],
        ["  sampler time outside the denoiser, guided - unguided",
         f"{loop_g - loop_u:+.3f} s", "(reference)", ""],
        ["  guided / unguided attributable to the sampler (1 + that / unguided wall)",
         f"{attributable:.3f}", "<= 1.05", ok(attributable <= 1.05)],
        [f"batched ({args.batch}) / batch-1 images/s", f"{speedup:.2f}x", ">= 3x", ok(speedup >= 3.0)],
        ["  same, process CPU time per image", f"{speedup_cpu:.2f}x", ">= 3x", ok(speedup_cpu >= 3.0)],
    ]))
    if args.profile:
        print()
        print(f"torch.profiler, one guided run at batch {args.batch}, top operators by self CPU time:")
        print(profile(backbone, args.batch, args.steps))


if __name__ == "__main__":
    main()
