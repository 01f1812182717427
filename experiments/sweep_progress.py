"""Where a config's student sweep stands in a storage root: runs finished, the table so far, time left.

A full-table sweep (``configs/embedded-full.yaml``: 216 student runs) takes many hours on a
CPU and is meant to run in pieces (``train_students`` resumes run by run). This computes the
key of every planned run as the sweep does (reading the distilled sets and the teacher; nothing
is trained), reads the finished-run records under ``students/runs/`` of ``MGD3_HOME`` that have
those keys, and prints

- per (student, protocol, IPC): runs finished / planned, their median seconds, and the time
  the rest would take at that median (groups with no finished run: "?");
- the report's table over the finished runs only (each cell's ``n`` says how many; HLR needs
  the full-data row, which is the teacher's when the teacher is that run: then "–").

Records of other settings (another schedule, precision, batch-norm statistics) or of other
images in the same root are not counted.

    MGD3_HOME=mgd3_home_full .venv/bin/python experiments/sweep_progress.py configs/embedded-full.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # bench/_common.py
from _common import markdown_table  # noqa: E402

import pandas as pd  # noqa: E402

from mgd3_core.config import load_config  # noqa: E402
from mgd3_core.evaluate import (FULL_DATA, _load_run, _student_runs, load_teacher, sweep_runs,  # noqa: E402
                                teacher_is_full_data_run)
from mgd3_core.report import summary_table, table_markdown  # noqa: E402


def planned_runs(cfg, home: Path) -> dict[tuple, dict]:
    """{(method, ipc, gen_seed, student, protocol, train_seed): {"epochs", "path"}} of the whole
    sweep, ``path`` being the record the run is stored under in ``home``, keyed exactly as the
    sweep keys it (:func:`mgd3_core.evaluate.sweep_runs`: settings, images, teacher), or None
    while its distilled set or the teacher is not there yet. A full-data run that the teacher run
    stands in for has no record and is not planned."""
    try:
        teacher = load_teacher(cfg, home) if "soft" in cfg.evaluation.protocols else None
    except FileNotFoundError:
        teacher = None
    plan = {}
    for method in [*cfg.methods, FULL_DATA]:
        runs = sweep_runs(cfg, home, method, teacher)
        for ipc, gen_seed, student, protocol, train_seed in _student_runs(cfg, method):
            if method == FULL_DATA and teacher_is_full_data_run(cfg, student, train_seed):
                if runs is not None:
                    next(runs, None)  # its entry in sweep_runs: no record
                continue
            epochs = (cfg.evaluation.hard_for(student).full_data_epochs if method == FULL_DATA
                      else cfg.epochs_for_ipc(ipc, protocol, student))
            path = None
            if runs is not None:
                try:
                    path = next(runs)[3]
                except FileNotFoundError:  # its set is not distilled yet: no record of it or what follows
                    runs = None
            if protocol == "soft" and teacher is None:
                path = None
            plan[(method, ipc, gen_seed, student, protocol, train_seed)] = dict(epochs=epochs, path=path)
    return plan


def finished_rows(plan: dict[tuple, dict]) -> list[dict]:
    """Rows of the planned runs whose records exist (a damaged record: a warning, not counted)."""
    rows = [_load_run(entry["path"]) for entry in plan.values() if entry["path"] is not None]
    return [r for r in rows if r is not None]


def progress_table(plan: dict[tuple, dict], rows: list[dict]) -> tuple[list[list], float]:
    """Per (student, protocol, IPC): finished / planned runs, median seconds, seconds left."""
    planned: dict[tuple, int] = defaultdict(int)
    for method, ipc, _, student, protocol, _ in plan:
        if method != FULL_DATA:
            planned[(student, protocol, ipc)] += 1
    seconds: dict[tuple, list] = defaultdict(list)
    for r in rows:
        if r["method"] != FULL_DATA:
            seconds[(r["student"], r["protocol"], int(r["ipc"]))].append(float(r["seconds"]))
    out, left_total = [], 0.0
    for group in sorted(planned):
        done, want = seconds.get(group, []), planned[group]
        med = statistics.median(done) if done else None
        left = None if med is None else med * (want - len(done))
        left_total += left or 0.0
        out.append([*group, f"{len(done)} / {want}", "?" if med is None else f"{med:.0f}",
                    "?" if left is None else f"{left / 3600:.2f}"])
    return out, left_total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default="configs/embedded-full.yaml")
    p.add_argument("--home", default=os.environ.get("MGD3_HOME", "mgd3_home"),
                   help="the storage root (default: $MGD3_HOME, else mgd3_home)")
    args = p.parse_args()
    cfg = load_config(args.config)
    home = Path(args.home)
    plan = planned_runs(cfg, home)
    rows = finished_rows(plan)
    table, left = progress_table(plan, rows)
    spent = sum(float(r["seconds"]) for r in rows)
    print(f"{args.config} in {home} (scored on the {cfg.evaluation.split} split): {len(rows)} of {len(plan)} "
          "student runs finished "
          f"({spent / 3600:.2f} h of training); the rest at the medians below: {left / 3600:.2f} h "
          "more (groups marked ? not included)\n")
    print(markdown_table(["student", "protocol", "IPC", "runs", "median s / run", "h left"], table))
    if rows:
        print()
        kinds = {name: v.kind for name, v in cfg.method_variants().items()}  # variants beside their base method
        print(table_markdown(summary_table(pd.DataFrame(rows), kinds=kinds), cfg.evaluation.split))


if __name__ == "__main__":
    main()
