"""How far MGD3's images land from their modes, next to unguided sampling, from a finished run.

    .venv/bin/python experiments/guidance_effect.py [--config configs/embedded.yaml] [--ipc 10] [--out grid.png]

Reads the lineage manifests of the distilled sets (no sampling here): the mean L2 distance, in
latent space, of each image's final latent to its assigned mode and to the nearest other mode,
per method, over every class and generation seed. Writes a grid image: per class, one row of
unguided samples above one row of MGD3 samples from the same seeds (generation seed 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's mgd3_core, not an installed one
from mgd3_core.config import DIFFUSION_METHODS, load_config  # noqa: E402
from mgd3_core.distilled import load_distilled_class, read_manifest  # noqa: E402
from mgd3_core.images import image_grid  # noqa: E402
from mgd3_core.pipeline import class_infos  # noqa: E402
from mgd3_core.storage import distilled_root, report_dir, set_dir, storage_root  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=None)
    ap.add_argument("--ipc", type=int, default=None)
    ap.add_argument("--out", default=None, help="grid PNG (default: <run>/report/mgd3_vs_unguided.png)")
    args = ap.parse_args()
    cfg, home = load_config(args.config), storage_root()
    ipc = args.ipc or cfg.ipc[0]
    print("$", " ".join([Path(sys.executable).name, *sys.argv]))
    root = distilled_root(cfg, home)
    rows = []
    for method in [m for m in cfg.methods if cfg.kind_of(m) in DIFFUSION_METHODS]:  # variants too
        for g in cfg.evaluation.generation_seeds:
            for c in class_infos(cfg):
                rows += read_manifest(set_dir(root, method, ipc, g), c.id)
    df = pd.DataFrame(rows)
    for col in ("dist_to_mode", "dist_to_nearest_other_mode"):
        df[col] = df[col].astype(float)
    df["closer_to_own_mode"] = df["dist_to_mode"] < df["dist_to_nearest_other_mode"]
    t = df.groupby("method").agg(images=("file", "size"), dist_to_mode=("dist_to_mode", "mean"),
                                 dist_to_mode_std=("dist_to_mode", "std"),
                                 dist_to_nearest_other=("dist_to_nearest_other_mode", "mean"),
                                 own_mode_nearest=("closer_to_own_mode", "mean"))
    print(f"IPC {ipc}, config {cfg.name}, {len(cfg.evaluation.generation_seeds)} generation seed(s), latent L2 distances")
    print("| method | images | mean dist to own mode | std | mean dist to nearest other mode | share nearest to own mode |")
    print("|---|---|---|---|---|---|")
    for m, r in t.iterrows():
        print(f"| {m} | {int(r.images)} | {r.dist_to_mode:.3f} | {r.dist_to_mode_std:.3f} | "
              f"{r.dist_to_nearest_other:.3f} | {100 * r.own_mode_nearest:.1f} % |")
    g0 = cfg.evaluation.generation_seeds[0]
    tiles = []
    for c in class_infos(cfg):
        for method in ("unguided", "mgd3"):
            tiles.append(load_distilled_class(set_dir(root, method, ipc, g0), c.id)[0][:10])
    out = Path(args.out) if args.out else report_dir(cfg, home) / "mgd3_vs_unguided.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(np.concatenate(tiles), nrow=min(ipc, 10)).save(out)
    print(f"grid (per class: unguided row, then MGD3 row, same seeds): {out}")


if __name__ == "__main__":
    main()
