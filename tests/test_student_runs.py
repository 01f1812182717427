"""Student sweeps resume: each finished run is kept, keyed by everything it depends on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mgd3_core import evaluate, storage, training
from mgd3_core.config import config_from_dict
from mgd3_core.progress import no_progress
from mgd3_core.training import TrainResult


class Crash(RuntimeError):
    pass


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    """train_students on tiny fake sets, with the trainer replaced by a counting stand-in
    whose accuracy identifies the run (so reused rows can be told from retrained ones)."""
    rng = np.random.default_rng(0)
    sets = {(m, ipc, g): rng.integers(0, 256, (2 * ipc, 1, 8, 8), dtype=np.uint8)
            for m in ("mgd3",) for ipc in (1, 2) for g in (0, 1, 2)}
    test = (rng.integers(0, 256, (6, 1, 8, 8), dtype=np.uint8), np.array([0, 1, 0, 1, 0, 1]))
    monkeypatch.setattr(evaluate, "real_split", lambda cfg, split: test)
    monkeypatch.setattr(evaluate, "distilled_set",
                        lambda cfg, home, m, ipc, g: (sets[m, ipc, g], np.repeat([0, 1], ipc)))
    state = {"calls": [], "crash_at": None}

    def fake_train(model, x, y, xt, yt, *, epochs, seed, **kw):
        state["calls"].append((len(x), int(x.sum()) % 1000, seed))
        if state["crash_at"] is not None and len(state["calls"]) == state["crash_at"]:
            raise Crash("killed mid-sweep")
        acc = float(int(x.sum()) % 97)
        for e in range(1, epochs + 1):
            kw["progress"]({"epoch": e, "epochs": epochs, "loss": 1.0 / e, "eval_acc": acc if e == epochs else None})
        return TrainResult(final_acc=acc, best_acc=acc + 1, best_epoch=epochs, epochs=epochs, seconds=0.0,
                           history=[])

    monkeypatch.setattr(training, "train_hard_label", fake_train)

    def run(progress=no_progress, **evaluation):
        cfg = config_from_dict({"name": "t", "ipc": [1, 2], "evaluation": {
            "students": ["convnet"], "generation_seeds": [0, 1], **evaluation}})
        return evaluate.train_students(cfg, tmp_path, "mgd3", progress=progress)

    return run, state, sets, tmp_path


def test_an_interrupted_sweep_trains_only_the_runs_it_lacks(sweep):
    run, state, _, _ = sweep
    state["crash_at"] = 3
    with pytest.raises(Crash):
        run()
    assert len(state["calls"]) == 3                       # 2 runs finished, the 3rd died
    state["calls"].clear()
    state["crash_at"] = None
    df = run()
    assert len(state["calls"]) == 2                       # only the dead run and the last one
    assert len(df) == 4 and df[["ipc", "gen_seed"]].drop_duplicates().shape[0] == 4
    state["calls"].clear()
    again = run()
    assert state["calls"] == []                           # everything reused
    np.testing.assert_array_equal(again["final_acc"].to_numpy(), df["final_acc"].to_numpy())


def test_an_added_seed_or_a_changed_set_or_setting_retrains_exactly_what_changed(sweep):
    run, state, sets, _ = sweep
    first = run()
    assert len(state["calls"]) == 4
    state["calls"].clear()
    more = run(generation_seeds=[0, 1, 2])
    assert len(state["calls"]) == 2 and len(more) == 6    # the new seed at IPC 1 and 2
    state["calls"].clear()
    sets["mgd3", 2, 1][0, 0, 0, 0] ^= 1                   # one pixel of one set changes
    changed = run()
    assert len(state["calls"]) == 1
    row = changed[(changed.ipc == 2) & (changed.gen_seed == 1)].iloc[0]
    assert row.final_acc == float(int(sets["mgd3", 2, 1].sum()) % 97)
    same = first[(first.ipc == 1)].final_acc.to_numpy()
    np.testing.assert_array_equal(changed[changed.ipc == 1].final_acc.to_numpy(), same)
    state["calls"].clear()
    run(hard={"lr": 0.02})                                # a protocol setting: everything again
    assert len(state["calls"]) == 4


def test_adding_soft_labels_or_retraining_the_teacher_keeps_the_hard_label_runs(sweep, monkeypatch):
    run, state, _, _ = sweep
    import torch

    teacher = {"net": torch.nn.Linear(2, 2)}
    monkeypatch.setattr(evaluate, "load_teacher", lambda cfg, home: teacher["net"])
    soft_calls = []

    def fake_soft(model, x, teacher_net, xt, yt, *, cfg, epochs, seed, **kw):
        soft_calls.append((len(x), float(teacher_net.weight.detach().sum())))
        return TrainResult(final_acc=50.0, best_acc=50.0, best_epoch=epochs, epochs=epochs, seconds=0.0, history=[])

    monkeypatch.setattr(training, "train_soft_label", fake_soft)
    run()
    assert len(state["calls"]) == 4
    state["calls"].clear()
    both = run(protocols=["hard", "soft"])
    assert state["calls"] == [] and len(soft_calls) == 4    # hard runs reused, soft ones trained
    assert sorted(both.protocol.value_counts().items()) == [("hard", 4), ("soft", 4)]
    soft_calls.clear()
    with torch.no_grad():
        teacher["net"].weight.add_(1.0)                      # a retrained teacher: new soft labels
    run(protocols=["hard", "soft"])
    assert state["calls"] == [] and len(soft_calls) == 4    # only the soft runs again


def test_a_torn_record_is_trained_again(sweep):
    run, state, _, home = sweep
    run()
    state["calls"].clear()
    records = sorted(storage.student_runs_dir(config_from_dict({"name": "t"}), home).glob("*.json"))
    assert len(records) == 4
    records[0].write_text('{"row": ')
    run()
    assert len(state["calls"]) == 1



def test_long_runs_report_about_five_epoch_lines_and_each_evaluation(sweep):
    run, _, _, _ = sweep
    lines: list[tuple[str, float]] = []
    run(progress=lambda msg, frac: lines.append((msg, frac)), hard={"epochs_by_ipc": {1: 300, 2: 30}})
    ipc1 = [m for m, _ in lines if "ipc=1 seed=0" in m and "epoch" in m]
    assert [m.split("epoch ")[1].split(" ")[0] for m in ipc1] == [f"{e}/300" for e in (60, 120, 180, 240, 300)]
    assert "test " in ipc1[-1] and "test " not in ipc1[0]
    fracs = [f for _, f in lines]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0


def test_the_teacher_run_stands_in_only_for_the_same_full_data_run(tmp_path):
    def cfg(precision="float32", **teacher):
        return config_from_dict({"name": "t", "evaluation": {"training_seeds": [3, 4], "teacher": teacher,
                                                             "hard": {"full_data_epochs": 5}, "precision": precision}})

    assert evaluate.teacher_is_full_data_run(cfg(), "convnet", 3)
    assert not evaluate.teacher_is_full_data_run(cfg(), "convnet", 4)       # another training seed
    assert not evaluate.teacher_is_full_data_run(cfg(), "resnet18", 3)      # another student
    assert evaluate.teacher_is_full_data_run(cfg(model="resnet18"), "resnet18", 3)
    assert not evaluate.teacher_is_full_data_run(cfg(model="resnet18", epochs=9), "resnet18", 3)  # longer run
    assert not evaluate.teacher_is_full_data_run(cfg("bfloat16"), "convnet", 3)  # the teacher trains in float32

    # A stored teacher of another model is refused by name, not loaded into the wrong network.
    weights = storage.teacher_weights_file(cfg(), tmp_path)
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    (storage.teacher_dir(cfg(), tmp_path) / "meta.json").write_text('{"student": "convnet"}')
    with pytest.raises(ValueError, match="is a 'convnet' teacher but evaluation.teacher.model is 'resnet18'"):
        evaluate.load_teacher(cfg(model="resnet18"), tmp_path)


def test_bfloat16_students_run_under_autocast_and_keep_the_float32_runs(sweep, monkeypatch):
    run, state, _, _ = sweep
    fake, autocast = training.train_hard_label, []

    def spy(*args, **kwargs):
        autocast.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return fake(*args, **kwargs)

    monkeypatch.setattr(training, "train_hard_label", spy)
    run()
    assert autocast == [None] * 4
    state["calls"].clear(), autocast.clear()
    run(precision="bfloat16")
    assert len(state["calls"]) == 4 and autocast == [torch.bfloat16] * 4  # other results: other keys
    state["calls"].clear()
    run()
    assert state["calls"] == []  # the float32 runs are still there, under their old keys


def test_a_bfloat16_run_learns_like_the_float32_run_and_keeps_float32_weights():
    """Through the code path of train_students. A bug this catches: one autocast context around the
    whole run with its cast cache on keeps the bfloat16 copies of the first step's weights, so the
    forward passes never see an update and the loss stays where it started."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 8)
    x = np.where(y[:, None, None, None] == 1, 200, 40) + rng.integers(0, 40, (16, 1, 16, 16))
    x = x.astype(np.uint8)
    losses, dtypes = {}, []
    for precision in ("float32", "bfloat16"):
        cfg = config_from_dict({"name": "t", "dataset": {"image_size": 16},
                                "evaluation": {"precision": precision, "hard": {"batch_size": 8}}})
        spec = dict(method="m", ipc=8, student="convnet", protocol="hard", gen_seed=0, train_seed=0, epochs=30)
        records = []
        original = training.train_hard_label

        def spy(model, *args, **kwargs):
            model.register_forward_hook(lambda m, a, out: dtypes.append((precision, out.dtype)))
            return original(model, *args, **kwargs)

        training.train_hard_label = spy
        try:
            row = evaluate._train_student(cfg, spec, (x, y), (x, y), None, records.append)
        finally:
            training.train_hard_label = original
        losses[precision] = [r["loss"] for r in records]
        assert 0 <= row["final_acc"] <= 100
    assert {d for p, d in dtypes if p == "bfloat16"} == {torch.bfloat16}
    assert {d for p, d in dtypes if p == "float32"} == {torch.float32}
    f32, b16 = losses["float32"], losses["bfloat16"]
    assert f32[-1] < 0.5 * f32[0]  # the task is learnable in 30 epochs
    # bfloat16 rounds, so the curves differ; learning as much is what matters (tolerance: 0.15 of the start).
    assert b16[-1] < 0.5 * b16[0] and abs(b16[-1] - f32[-1]) < 0.15 * f32[0]
