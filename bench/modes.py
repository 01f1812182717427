"""Mode discovery time per class vs class size and latent dimension (issue 7, part 4).

Times ``mgd3_core.modes.ModeFinder`` exactly as configured (``ModesConfig``:
method, n_init, max_iter, seed; override with flags) on one class's latents,
for class sizes up to 1,300 (an ImageNet-1K class) and latent dimensions up to
4,096 (4 x 32 x 32, the SD-VAE latent of a 256 px image), at IPC 10 and 50.

The latents are synthetic, float32 like the latent store: a mixture of 20
Gaussian clusters (unit-variance centres) with per-point noise of standard
deviation ``--noise`` (3.0: overlapping clusters, so Lloyd's iterations do not
stop after one or two steps as they would on well separated blobs). Clustering
time depends on the data only through the number of iterations.

    .venv/bin/python bench/modes.py           # 3 x 3 x 2 grid, 3 repeats (medians)
    .venv/bin/python bench/modes.py --quick   # corners of the grid, 1 repeat
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, markdown_table, median, set_threads  # noqa: E402

import numpy as np  # noqa: E402

from mgd3_core.config import ModesConfig  # noqa: E402
from mgd3_core.modes import ModeFinder  # noqa: E402


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def synthetic_class(n: int, dim: int, noise: float, seed: int, clusters: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return x.astype(np.float32)


def main() -> None:
    cfg = ModesConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=ints, default=[130, 500, 1300], help="images per class")
    p.add_argument("--dims", type=ints, default=[256, 1024, 4096], help="flattened latent dimension")
    p.add_argument("--ipc", type=ints, default=[10, 50], help="modes per class")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--method", default=cfg.method, choices=["kmeans", "gmm", "bisecting_kmeans"])
    p.add_argument("--n-init", type=int, default=cfg.n_init)
    p.add_argument("--max-iter", type=int, default=cfg.max_iter)
    p.add_argument("--noise", type=float, default=3.0, help="within-cluster std of the synthetic latents")
    p.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="smallest and largest size/dim only, 1 repeat")
    args = p.parse_args()
    if args.quick:
        args.sizes = sorted({min(args.sizes), max(args.sizes)})
        args.dims = sorted({min(args.dims), max(args.dims)})
        args.repeats = 1

    threads = set_threads(args.threads)
    from threadpoolctl import threadpool_limits

    print(header(threads, extra=f"BLAS/OpenMP threads {threads} (threadpoolctl) | repeats {args.repeats}"))
    print(f"mode finder: ModeFinder(method={args.method!r}, n_init={args.n_init}, max_iter={args.max_iter}, "
          f"random_state={cfg.seed}) (ModesConfig defaults unless overridden); synthetic float32 latents: "
          f"20 clusters, noise std {args.noise}")
    print()
    rows = []
    with threadpool_limits(limits=threads):
        # Warm-up: imports and OpenMP pool start-up are not part of any row.
        ModeFinder(2, args.method, n_init=1, max_iter=5).fit(synthetic_class(20, 8, 1.0, 0))
        for n in args.sizes:
            for dim in args.dims:
                x = synthetic_class(n, dim, args.noise, seed=n * 7919 + dim)
                for ipc in args.ipc:
                    if ipc > n:
                        continue
                    times = []
                    for _ in range(args.repeats):
                        finder = ModeFinder(ipc, args.method, n_init=args.n_init, max_iter=args.max_iter,
                                            random_state=cfg.seed)
                        t0 = time.perf_counter()
                        finder.fit(x)
                        times.append(time.perf_counter() - t0)
                    t = median(times)
                    rows.append([n, dim, ipc, f"{t:.3f}", f"{min(times):.3f}", f"{1000 * t / n:.2f}",
                                 f"{1000 * t / 60:.1f}"])
                    print(f"  N {n} D {dim} IPC {ipc}: {t:.3f} s", file=sys.stderr, flush=True)
    print(markdown_table(["class size N", "latent dim D", "IPC", "median s / class", "min s",
                          "ms / image", "1000 such classes, min"], rows))


if __name__ == "__main__":
    main()
