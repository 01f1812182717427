"""Where a config's student sweep stands in a storage root: runs finished, the table so far, time left.

A full-table sweep (``configs/embedded-full.yaml``: 216 student runs) takes many hours on a
CPU and is meant to run in pieces (``train_students`` resumes run by run). This reads the
finished-run records under ``students/runs/`` of ``MGD3_HOME`` (nothing is trained or
loaded), keeps the records whose settings belong to the config (method, IPC, generation and
training seed, student, protocol, epochs), and prints

- per (student, protocol, IPC): runs finished / planned, their median seconds, and the time
  the rest would take at that median (groups with no finished run: "?");
- the report's table over the finished runs only (each cell's ``n`` says how many; HLR needs
  the full-data row, which is the teacher's when the teacher is that run: then "–").

One storage root per experiment (README): records of another config whose runs share these
settings but differ in something the key holds (precision, images) would be counted too.

    MGD3_HOME=mgd3_home_full .venv/bin/python bench/sweep_progress.py configs/embedded-full.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table  # noqa: E402

import pandas as pd  # noqa: E402

from mgd3_core import storage  # noqa: E402
from mgd3_core.config import load_config  # noqa: E402
from mgd3_core.evaluate import FULL_DATA, _student_runs, teacher_is_full_data_run  # noqa: E402
from mgd3_core.report import summary_table, table_markdown  # noqa: E402


def planned_runs(cfg) -> dict[tuple, dict]:
    """{(method, ipc, gen_seed, student, protocol, train_seed): expected spec} of the whole sweep
    (a full-data run that the teacher run stands in for has no record and is not planned)."""
    plan = {}
    for method in [*cfg.methods, FULL_DATA]:
        for ipc, gen_seed, student, protocol, train_seed in _student_runs(cfg, method):
            if method == FULL_DATA and teacher_is_full_data_run(cfg, student, train_seed):
                continue
            epochs = (cfg.evaluation.hard_for(student).full_data_epochs if method == FULL_DATA
                      else cfg.epochs_for_ipc(ipc, protocol, student))
            plan[(method, ipc, gen_seed, student, protocol, train_seed)] = dict(epochs=epochs)
    return plan


def finished_rows(cfg, home: Path, plan: dict[tuple, dict]) -> list[dict]:
    """Rows of the finished runs that belong to ``plan`` (:func:`planned_runs` of ``cfg``;
    unreadable records are skipped)."""
    rows = []
    for path in sorted(storage.student_runs_dir(cfg, home).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            spec, row = record["spec"], record["row"]
            key = (spec["method"], spec["ipc"], spec["gen_seed"], spec["student"], spec["protocol"],
                   spec["train_seed"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"{path}: unreadable record ({err}), not counted", file=sys.stderr)
            continue
        if key in plan and plan[key]["epochs"] == spec["epochs"]:
            rows.append(row)
    return rows


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
    plan = planned_runs(cfg)
    rows = finished_rows(cfg, home, plan)
    table, left = progress_table(plan, rows)
    spent = sum(float(r["seconds"]) for r in rows)
    print(f"{args.config} in {home}: {len(rows)} of {len(plan)} student runs finished "
          f"({spent / 3600:.2f} h of training); the rest at the medians below: {left / 3600:.2f} h "
          "more (groups marked ? not included)\n")
    print(markdown_table(["student", "protocol", "IPC", "runs", "median s / run", "h left"], table))
    if rows:
        print()
        print(table_markdown(summary_table(pd.DataFrame(rows))))


if __name__ == "__main__":
    main()
