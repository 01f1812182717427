"""A batch-norm student (ResNet-18) on a home's distilled sets, hard labels, validation split:
accuracy with batch-norm statistics as gathered in training and recomputed on the clean images.

Trains the config's hard-label protocol (with the student's ``evaluation.hard_by_student``
settings, except for the epochs, which are given) on each stored set, in the config's
``evaluation.precision``, and evaluates the final model on the validation split (held out of
the training split, never the test split) twice: with the running statistics gathered on the
augmented batches (``evaluation.bn_stats: running``) and after recomputing them on the set's
clean images (``recomputed``). Training itself does not depend on the choice, so one run gives
both. Prints one row per (method, IPC, generation seed, epochs) and the median per (IPC, epochs).

    MGD3_HOME=<home with distilled sets> .venv/bin/python experiments/bn_students.py configs/embedded-full.yaml \\
        --methods mgd3 random_real --ipc 1 10 --epochs 100 300
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # bench/_common.py
import torch  # noqa: E402
from _common import header, markdown_table  # noqa: E402

from mgd3_core.config import load_config  # noqa: E402
from mgd3_core.evaluate import distilled_set, real_split  # noqa: E402
from mgd3_core.students import build_student, evaluate, recompute_bn_stats, student_autocast  # noqa: E402
from mgd3_core.training import train_hard_label  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default="configs/embedded-full.yaml")
    p.add_argument("--home", default=os.environ.get("MGD3_HOME", "mgd3_home"))
    p.add_argument("--student", default="resnet18")
    p.add_argument("--methods", nargs="+", default=["mgd3"])
    p.add_argument("--ipc", nargs="+", type=int, default=[10])
    p.add_argument("--gen-seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", nargs="+", type=int, default=[100, 300])
    p.add_argument("--train-seed", type=int, default=0)
    args = p.parse_args()
    cfg, home = load_config(args.config), Path(args.home)
    ev = cfg.evaluation
    hard = ev.hard_for(args.student)
    xv, yv = real_split(cfg, "val")
    n_classes = int(yv.max()) + 1
    print(header(torch.get_num_threads(), ev.device))
    rows, by_cell = [], {}
    for method in args.methods:
        for ipc in args.ipc:
            for gen_seed in args.gen_seeds:
                x, y = distilled_set(cfg, home, method, ipc, gen_seed)
                for epochs in args.epochs:
                    model = build_student(args.student, x.shape[1], n_classes, x.shape[-1], seed=args.train_seed)
                    t0 = time.perf_counter()
                    with student_autocast(ev.device, ev.precision):
                        res = train_hard_label(model, x, y, xv, yv, cfg=hard, epochs=epochs, seed=args.train_seed,
                                               orientation_sensitive=cfg.dataset.orientation_sensitive,
                                               device=ev.device, evaluations=1, bn_stats="running")
                        recompute_bn_stats(model, x, device=ev.device)
                        recomputed = evaluate(model, xv, yv, device=ev.device)
                    seconds = time.perf_counter() - t0
                    rows.append([method, ipc, gen_seed, epochs, f"{res.final_acc:.2f}", f"{recomputed:.2f}",
                                 f"{seconds:.0f}"])
                    by_cell.setdefault((method, ipc, epochs), []).append((res.final_acc, recomputed))
                    print(" | ".join(map(str, rows[-1])), flush=True)
    print()
    print(markdown_table(["method", "IPC", "gen seed", "epochs", "val % (running)", "val % (recomputed)", "s"], rows))
    print()
    print(markdown_table(["method", "IPC", "epochs", "median val % (running)", "median val % (recomputed)"],
                         [[m, i, e, f"{statistics.median(a for a, _ in v):.2f}",
                           f"{statistics.median(b for _, b in v):.2f}"] for (m, i, e), v in sorted(by_cell.items())]))


if __name__ == "__main__":
    main()
