"""bench/sweep_progress.py: counts a config's finished student runs and nothing else."""

import importlib.util
import json
from pathlib import Path

from mgd3_core import storage
from mgd3_core.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("sweep_progress", ROOT / "bench" / "sweep_progress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(runs: Path, name: str, seconds: float, **spec) -> None:
    row = dict(spec, final_acc=90.0 + seconds / 100, best_acc=91.0, ranking_acc=91.0, seconds=seconds)
    (runs / f"{name}.json").write_text(json.dumps({"spec": spec, "row": row}))


def test_only_the_configs_runs_count_and_the_rest_is_estimated_from_their_medians(tmp_path):
    bench = _bench()
    cfg = load_config(ROOT / "configs" / "embedded-full.yaml")
    runs = storage.student_runs_dir(cfg, tmp_path)
    runs.mkdir(parents=True)
    base = dict(method="mgd3", ipc=10, student="convnet", protocol="hard", train_seed=0,
                epochs=cfg.epochs_for_ipc(10, "hard"))
    _record(runs, "a", 100.0, gen_seed=0, **base)
    _record(runs, "b", 300.0, gen_seed=1, **base)
    _record(runs, "c", 200.0, gen_seed=2, **base)
    _record(runs, "other_schedule", 5.0, gen_seed=0, **dict(base, epochs=30))  # the demo's schedule
    _record(runs, "other_seed", 5.0, gen_seed=7, **base)
    (runs / "torn.json").write_text('{"spec": {"method"')

    plan = bench.planned_runs(cfg)
    rows = bench.finished_rows(cfg, tmp_path, plan)
    assert sorted(r["seconds"] for r in rows) == [100.0, 200.0, 300.0]

    table, left = bench.progress_table(plan, rows)
    group = next(r for r in table if r[:3] == ["convnet", "hard", 10])
    per_group = len(cfg.methods) * len(cfg.evaluation.generation_seeds)
    assert group[3] == f"3 / {per_group}"
    assert group[4] == "200"  # median seconds of the three runs
    assert left == (per_group - 3) * 200.0  # only groups with a finished run are estimated
    assert all(r[4] == "?" for r in table if r[:3] != ["convnet", "hard", 10])
