"""experiments/sweep_progress.py: counts the records a config's sweep would reuse, and nothing else."""

import importlib.util
import itertools
import statistics
from pathlib import Path

import numpy as np

from mgd3_core import evaluate, training
from mgd3_core.config import config_from_dict
from mgd3_core.training import TrainResult

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("sweep_progress", ROOT / "experiments" / "sweep_progress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_the_records_the_sweep_would_reuse_count_and_the_rest_is_estimated(tmp_path, monkeypatch):
    bench = _bench()
    rng = np.random.default_rng(0)
    sets = {(m, g): rng.integers(0, 256, (4, 1, 8, 8), dtype=np.uint8) for m in ("mgd3", "unguided") for g in (0, 1, 2)}
    y = np.array([0, 1, 0, 1])
    monkeypatch.setattr(evaluate, "real_split", lambda cfg, split: (sets["mgd3", 0], y))
    monkeypatch.setattr(evaluate, "distilled_set", lambda cfg, home, m, ipc, g: (sets[m, g], y))
    accuracy = itertools.chain([10.0, 30.0, 20.0], itertools.repeat(99.0))  # tells the runs apart

    def fake_train(model, *args, epochs, **kw):
        acc = next(accuracy)
        return TrainResult(final_acc=acc, best_acc=acc, best_epoch=epochs, epochs=epochs, seconds=0.0, history=[])

    monkeypatch.setattr(training, "train_hard_label", fake_train)

    def config(**hard):
        return config_from_dict({"name": "t", "ipc": [2], "methods": ["mgd3", "unguided"], "dataset": {"image_size": 8},
                                 "evaluation": {"students": ["convnet"], "hard": {"epochs_by_ipc": {1: 7}, **hard}}})

    cfg = config()
    evaluate.train_students(cfg, tmp_path, "mgd3")                               # 10, 30, 20 %
    evaluate.train_students(config(lr=0.5), tmp_path, "unguided")                # another setting: not this sweep's
    other = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"generation_seeds": [7]})})
    monkeypatch.setattr(evaluate, "distilled_set", lambda cfg, home, m, ipc, g: (sets[m, 0][::-1].copy(), y))
    evaluate.train_students(other, tmp_path, "unguided")                         # other images: not this sweep's
    monkeypatch.setattr(evaluate, "distilled_set", lambda cfg, home, m, ipc, g: (sets[m, g], y))

    plan = bench.planned_runs(cfg, tmp_path)
    assert len(plan) == 2 * 3  # 2 methods x 3 seeds; the full-data run is the teacher run (no record)
    rows = bench.finished_rows(plan)
    assert sorted(r["final_acc"] for r in rows) == [10.0, 20.0, 30.0]

    table, left = bench.progress_table(plan, rows)
    median = statistics.median(r["seconds"] for r in rows)
    assert table == [["convnet", "hard", 2, "3 / 6", f"{median:.0f}", f"{3 * median / 3600:.2f}"]]
    assert left == 3 * median  # the three unguided runs at the median of the finished group

    plan[("mgd3", 2, 0, "convnet", "hard", 0)]["path"].write_text('{"spec": {"method"')  # a damaged record: not counted, the others still are
    assert len(bench.finished_rows(bench.planned_runs(cfg, tmp_path))) == 2
