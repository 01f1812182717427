"""Expected wall time of a config's student sweep, from measured per-step costs (nothing is trained).

Counts what ``train_students`` / ``train_teacher`` would run for the config (runs, optimiser
steps by batch size, test-split evaluations; the teacher, the full-data bounds and every
method x IPC x generation seed x student x protocol x training seed), then times the real
code path on random uint8 images of the config's shape: ``train_hard_label`` /
``train_soft_label`` for a few one-step epochs at the protocol's batch size and at a small
batch (cost per step is fitted as a + b x batch), and one evaluation pass over a test-split-
sized batch. Median of ``--repeats``. Sampling, the backbone, latents and the reports are
not included (see docs/results.md, the demo from scratch, for those).

    .venv/bin/python experiments/student_sweep_cost.py configs/embedded-full.yaml
    .venv/bin/python experiments/student_sweep_cost.py configs/embedded.yaml --repeats 5
    .venv/bin/python experiments/student_sweep_cost.py configs/embedded-full.yaml --precision bfloat16
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # bench/_common.py
from _common import header, markdown_table, median, set_threads  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mgd3_core.config import ExperimentConfig, load_config  # noqa: E402
from mgd3_core.evaluate import teacher_is_full_data_run  # noqa: E402
from mgd3_core.students import build_student, student_autocast  # noqa: E402
from mgd3_core.training import _eval_epochs, evaluate, train_hard_label, train_soft_label  # noqa: E402


def sweep_plan(cfg: ExperimentConfig, n_classes: int, n_train: int):
    """{(model, protocol): {"runs", "steps": {batch: count}, "evals"}} the config trains, teacher included."""
    ev = cfg.evaluation
    plan: dict = defaultdict(lambda: {"runs": 0, "steps": defaultdict(int), "evals": 0})

    def add(model: str, protocol: str, n: int, epochs: int, batch: int, count: int = 1) -> None:
        entry = plan[(model, protocol)]
        entry["runs"] += count
        full, rest = divmod(n, batch)
        entry["steps"][batch] += count * full * epochs
        if rest:
            entry["steps"][rest] += count * epochs
        entry["evals"] += count * len(_eval_epochs(epochs, ev.evaluations, ev.ranking_evaluations))

    add(ev.teacher.model, "hard", n_train, cfg.teacher_epochs(), ev.hard_for(ev.teacher.model).batch_size)  # teacher
    for student in ev.students:
        for seed in ev.training_seeds:
            if not teacher_is_full_data_run(cfg, student, seed):
                hard = ev.hard_for(student)
                add(student, "hard", n_train, hard.full_data_epochs, hard.batch_size)
    runs = len(cfg.methods) * len(ev.generation_seeds) * len(ev.training_seeds)
    for ipc in cfg.ipc:
        for student in ev.students:
            for protocol in ev.protocols:
                batch = ev.hard_for(student).batch_size if protocol == "hard" else ev.soft.batch_size
                add(student, protocol, ipc * n_classes, cfg.epochs_for_ipc(ipc, protocol, student), batch, runs)
    return plan


def step_seconds(cfg: ExperimentConfig, model: str, protocol: str, batch: int, teacher, shape, n_classes,
                 epochs: int) -> float:
    """Seconds per optimiser step: ``epochs`` one-step epochs of the real protocol on ``batch`` images."""
    g = torch.Generator().manual_seed(batch)
    x = torch.randint(0, 256, (batch, *shape), generator=g, dtype=torch.uint8)
    y = torch.arange(batch) % n_classes
    ev = cfg.evaluation
    student = build_student(model, shape[0], n_classes, shape[-1], seed=0)
    common = dict(epochs=epochs, seed=0, orientation_sensitive=cfg.dataset.orientation_sensitive, evaluations=1)
    if protocol == "hard":
        res = train_hard_label(student, x, y, x[:1], y[:1], cfg=ev.hard_for(model).model_copy(update={"batch_size": batch}),
                               **common)
    else:
        res = train_soft_label(student, x, teacher, x[:1], y[:1], cfg=ev.soft.model_copy(update={"batch_size": batch}),
                               **common)
    return res.seconds / epochs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default="configs/embedded-full.yaml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8, help="one-step epochs timed per measurement")
    p.add_argument("--small-batch", type=int, default=10)
    p.add_argument("--classes", type=int, default=None, help="default: the config's classes (embedded: 10)")
    p.add_argument("--train-images", type=int, default=None, help="default: the config's training split")
    p.add_argument("--test-images", type=int, default=None, help="default: the config's test split")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", choices=["float32", "bfloat16"], default=None,
                   help="default: the config's evaluation.precision")
    args = p.parse_args()
    cfg = load_config(args.config)
    if args.precision:
        cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"precision": args.precision})})
    # As train_students runs them (the teacher, which trains in float32, is timed like a student).
    autocast = student_autocast("cpu", cfg.evaluation.precision)
    autocast.__enter__()
    threads = set_threads(args.threads)
    if None in (args.classes, args.train_images, args.test_images):
        from mgd3_core.evaluate import real_split

        (xtr, ytr), (xte, _) = real_split(cfg, "train"), real_split(cfg, "test")
        args.classes = args.classes or len(np.unique(ytr))
        args.train_images = args.train_images or len(xtr)
        args.test_images = args.test_images or len(xte)
    shape = (cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
    print(header(threads, extra=f"config {cfg.name} | load average {os.getloadavg()[0]:.1f} | "
                 f"{args.classes} classes, {args.train_images} train / {args.test_images} test images | "
                 f"precision {cfg.evaluation.precision}"))
    plan = sweep_plan(cfg, args.classes, args.train_images)
    teacher = build_student(cfg.evaluation.teacher.model, shape[0], args.classes, shape[-1], seed=0).eval()
    teacher.requires_grad_(False)
    test_x = torch.randint(0, 256, (args.test_images, *shape), dtype=torch.uint8)
    test_y = torch.arange(args.test_images) % args.classes

    rows, total = [], 0.0
    for (model, protocol), entry in sorted(plan.items()):
        big = cfg.evaluation.hard_for(model).batch_size if protocol == "hard" else cfg.evaluation.soft.batch_size
        measured = {b: [] for b in (big, args.small_batch)}
        evals = []
        step_seconds(cfg, model, protocol, big, teacher, shape, args.classes, 2)  # warm-up (oneDNN primitives)
        for _ in range(args.repeats):
            for b in measured:
                measured[b].append(step_seconds(cfg, model, protocol, b, teacher, shape, args.classes, args.epochs))
            net = build_student(model, shape[0], args.classes, shape[-1], seed=0)
            t0 = time.perf_counter()
            evaluate(net, test_x, test_y)
            evals.append(time.perf_counter() - t0)
        (b0, t_big), (b1, t_small) = ((b, median(v)) for b, v in measured.items())
        slope = (t_big - t_small) / (b0 - b1)
        cost = lambda b: t_small + slope * (b - b1)  # noqa: E731  linear in the batch size
        train_s = sum(n * cost(b) for b, n in entry["steps"].items())
        eval_s = entry["evals"] * median(evals)
        total += train_s + eval_s
        steps = sum(entry["steps"].values())
        rows.append([model, protocol, entry["runs"], f"{steps:,}", f"{1000 * t_big:.0f} / {1000 * t_small:.0f}",
                     entry["evals"], f"{median(evals):.2f}", f"{(train_s + eval_s) / 3600:.2f}"])
    print()
    print(markdown_table(["student", "protocol", "runs", "steps", f"ms/step (batch {cfg.evaluation.hard.batch_size}"
                          f" / {args.small_batch})", "test evals", "s/eval", "hours"], rows))
    print(f"\nstudent sweep total (teacher and full-data bounds included): {total / 3600:.2f} h")


if __name__ == "__main__":
    main()
