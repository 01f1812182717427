"""Incremental materialization: adding one class to a materialized C-class graph vs the full run
(issue 7, part 5; issue 5's "time to add one class"; target <= 1.5/C of the full run).

1. Setup (not timed in the ratio): train a small embedded backbone on all ten MNIST
   digits, so that it knows the class that will be added. The experiment uses it as
   a pretrained backbone: the point is what the *data* stages recompute, and an
   embedded backbone trained on the configured classes is, by design, a new backbone
   when a class is added (everything re-runs; see mgd3_assets/versions.py).
2. Full run: ``python -m mgd3_assets.demo``'s ``materialize_graph`` on classes 0..C-1,
   into a fresh SQLite instance (what ``make demo`` does, per stage, in one process).
3. Add class C to the config, reload the definitions, materialize again: only what
   is missing or stale runs (the new class's partitions, then the gathering assets:
   teacher, full-data students, students per method, reports, which read every class).

Prints wall and process-CPU seconds per stage (CPU time is robust to other load on
a shared machine) and the ratios, for all stages and for the per-class stages only.

    .venv/bin/python bench/incremental.py             # C = 9, 100 images/class, IPC 10, 50 steps
    .venv/bin/python bench/incremental.py --quick     # C = 3, small everything (a smoke run)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, markdown_table, set_threads  # noqa: E402

import dagster as dg  # noqa: E402
import yaml  # noqa: E402

from mgd3_assets import demo  # noqa: E402
from mgd3_assets.definitions import build_definitions  # noqa: E402
from mgd3_core import pipeline  # noqa: E402
from mgd3_core.backbones import embedded_backbone_dir  # noqa: E402
from mgd3_core.config import ALL_METHODS, config_from_dict  # noqa: E402

warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

PER_CLASS_JOBS = {demo.BACKBONE_JOB, demo.PER_CLASS_JOB, demo.DISTILL_JOB}


def experiment(args, classes: list[str], backbone: dict) -> dict:
    return {
        "name": "bench-incremental",
        "dataset": {"kind": "embedded_mnist", "classes": classes, "max_per_class": args.max_per_class},
        "backbone": backbone,
        "ipc": [args.ipc],
        "sampler": {"steps": args.steps, "t_stop": args.steps // 2},
        "methods": list(ALL_METHODS),
        "evaluation": {"generation_seeds": [0], "training_seeds": [0], "students": ["convnet"],
                       "representativeness_k": 10, "tsne_classes": 0,
                       "hard": {"epochs_by_ipc": {1: args.epochs}, "full_data_epochs": args.full_data_epochs}},
    }


def train_backbone(args, home: Path) -> Path:
    """A small embedded backbone (default architecture, few steps) on all ten digits."""
    raw = experiment(args, [str(d) for d in range(10)], {
        "kind": "embedded",
        "embedded": {"vae": {"steps": args.backbone_steps}, "dit": {"steps": args.backbone_steps}}})
    cfg = config_from_dict(raw)
    pipeline.ensure_backbone(cfg, home, progress=lambda *a: None)
    return embedded_backbone_dir(cfg, home)


def timed_graph(defs: dg.Definitions, instance: dg.DagsterInstance) -> list[tuple[str, int, float, float]]:
    """Materialize what is unsynced, stage by stage: (job, runs, wall s, CPU s) per stage."""
    rows = []
    for stage in demo.STAGES:
        wall, cpu = time.perf_counter(), time.process_time()
        report = demo.run_stage(defs, instance, stage, log=lambda m: None, log_level="WARNING")
        rows.append((stage.job, report.runs, time.perf_counter() - wall, time.process_time() - cpu))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=9, help="classes of the full run (one more is added)")
    p.add_argument("--max-per-class", type=int, default=100, help="training images per class")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--epochs", type=int, default=50, help="student epochs")
    p.add_argument("--full-data-epochs", type=int, default=5, help="teacher / full-data student epochs")
    p.add_argument("--backbone-steps", type=int, default=20, help="VAE and DiT training steps (setup only)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="3 classes, 30 images, IPC 2, 10 steps, 2 epochs")
    p.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temporary one)")
    args = p.parse_args()
    if args.quick:
        args.classes, args.max_per_class, args.ipc, args.steps, args.epochs = 3, 30, 2, 10, 2
        args.full_data_epochs, args.backbone_steps = 1, 3
    if not 1 <= args.classes <= 9:
        p.error("--classes must be 1..9 (MNIST has ten digits and one is added)")
    threads = set_threads(args.threads)
    print(header(threads, extra=f"C = {args.classes} -> {args.classes + 1} classes, {args.max_per_class} "
                                f"images/class, IPC {args.ipc}, {args.steps} sampling steps, "
                                f"{len(ALL_METHODS)} methods, student epochs {args.epochs}"))

    root = args.keep or Path(tempfile.mkdtemp(prefix="mgd3-bench-incremental-"))
    root.mkdir(parents=True, exist_ok=True)
    home, dagster_home = root / "home", root / "dagster_home"
    dagster_home.mkdir(exist_ok=True)
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump({
        "storage": {"sqlite": {"base_dir": str(root / "dagster")}}, "telemetry": {"enabled": False},
        "concurrency": {"pools": {"default_limit": 1}}}))
    try:
        t0 = time.perf_counter()
        bdir = train_backbone(args, home)
        print(f"setup: backbone on 10 digits ({args.backbone_steps} steps each) in {time.perf_counter() - t0:.1f} s")
        pretrained = {"kind": "pretrained", "transformer_dir": str(bdir), "vae_dir": str(bdir)}

        def defs_for(n: int) -> dg.Definitions:
            path = root / f"classes{n}.yaml"
            path.write_text(yaml.safe_dump(experiment(args, [str(d) for d in range(n)], pretrained)))
            return build_definitions(config_path=str(path), home=str(home))

        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            full = timed_graph(defs_for(args.classes), instance)
            added = timed_graph(defs_for(args.classes + 1), instance)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    rows = [(job, f, a) for (job, *f), (_, *a) in zip(full, added)]
    table = [[job, f[0], f"{f[1]:.1f}", f"{f[2]:.1f}", a[0], f"{a[1]:.1f}", f"{a[2]:.1f}"] for job, f, a in rows]

    def total(which, jobs=None):
        sel = [r for r in rows if jobs is None or r[0] in jobs]
        return tuple(sum(r[which][i] for r in sel) for i in range(3))

    tf, ta = total(1), total(2)
    pf, pa = total(1, PER_CLASS_JOBS), total(2, PER_CLASS_JOBS)
    table.append(["total", tf[0], f"{tf[1]:.1f}", f"{tf[2]:.1f}", ta[0], f"{ta[1]:.1f}", f"{ta[2]:.1f}"])
    print()
    print(markdown_table(["stage (job)", f"full: runs", "wall s", "CPU s", "add 1 class: runs", "wall s", "CPU s"],
                         table))
    target = 1.5 / args.classes
    print()
    ratio_rows = [
        ["add one class / full run, wall", f"{ta[1] / tf[1]:.3f}", f"<= 1.5/C = {target:.3f}",
         "met" if ta[1] / tf[1] <= target else "MISSED"],
        ["  same, process CPU time", f"{ta[2] / tf[2]:.3f}", f"<= {target:.3f}",
         "met" if ta[2] / tf[2] <= target else "MISSED"],
        ["per-class stages only (backbone, latents+modes, distilled), wall", f"{pa[1] / pf[1]:.3f}",
         f"(1/C = {1 / args.classes:.3f})", ""],
        ["  same, process CPU time", f"{pa[2] / pf[2]:.3f}", "", ""],
    ]
    print(markdown_table(["ratio", "value", "target", ""], ratio_rows))


if __name__ == "__main__":
    main()
