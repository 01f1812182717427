"""Batch-norm students are evaluated with statistics of the clean training images
(``evaluation.bn_stats``), not those gathered on augmented batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mgd3_core import evaluate, students, training
from mgd3_core.config import config_from_dict
from mgd3_core.students import as_model_input, build_student, has_batch_norm, recompute_bn_stats
from mgd3_core.training import TrainResult, train_hard_label
from mgd3_assets.versions import code_version


def _images(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, size, size), dtype=np.uint8)


@pytest.mark.parametrize("batches", [1, 2])
def test_recomputed_statistics_are_those_of_the_clean_images(batches, monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3)
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(conv, bn, nn.ReLU()).eval()
    bn.running_mean.fill_(5.0), bn.running_var.fill_(9.0)  # as if gathered on other inputs
    x = _images(8)
    # Two equal batches: the mean of their statistics is the whole set's mean.
    monkeypatch.setattr(students, "model_batch_size", lambda *a, **k: 8 // batches)
    assert recompute_bn_stats(model, x) is True
    with torch.no_grad():
        h = conv(as_model_input(torch.from_numpy(x)))
    # float32 sums over 8 x 6 x 6 values: agreement to 1e-5 (relative) on any CPU.
    torch.testing.assert_close(bn.running_mean, h.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    if batches == 1:  # one pass: exactly the set's (unbiased) variance
        torch.testing.assert_close(bn.running_var, h.var(dim=(0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and not model.training  # restored


def test_the_batches_are_even_so_none_holds_a_single_image(monkeypatch):
    """ResNet-18 at 8 px ends in 1x1 maps: batch norm refuses a batch of one image in train mode."""
    model = build_student("resnet18", 1, 2, 8, seed=0)
    monkeypatch.setattr(students, "model_batch_size", lambda *a, **k: 4)
    assert recompute_bn_stats(model, _images(5)) is True  # 3 + 2, not 4 + 1


def test_a_model_without_batch_norm_is_left_as_it_is():
    model = build_student("convnet", 1, 2, 8, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not has_batch_norm(model) and recompute_bn_stats(model, _images(4)) is False
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert has_batch_norm(build_student("resnet18", 1, 2, 8, seed=0))


def _train(bn_stats: str):
    x = _images(16, 16)
    y = np.repeat([0, 1], 8)
    cfg = config_from_dict({"name": "t", "evaluation": {"hard": {"batch_size": 8}}})
    model = build_student("resnet18", 1, 2, 16, seed=0)
    res = train_hard_label(model, x, y, x, y, cfg=cfg.evaluation.hard, epochs=3, seed=0,
                           orientation_sensitive=True, evaluations=1, bn_stats=bn_stats)
    return model, res, x


def test_training_is_the_same_and_only_the_evaluation_statistics_differ():
    recomputed, res_r, x = _train("recomputed")
    running, res_n, _ = _train("running")
    params_r, params_n = dict(recomputed.named_parameters()), dict(running.named_parameters())
    for name, p in params_r.items():  # the statistics never feed the updates (train mode uses the batch's)
        torch.testing.assert_close(p, params_n[name], rtol=1e-6, atol=1e-7)
    bn_r = [m for m in recomputed.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_n = [m for m in running.modules() if isinstance(m, nn.BatchNorm2d)]
    stored = [m.running_mean.clone() for m in bn_r]
    recompute_bn_stats(recomputed, x)  # evaluated with these: recomputing again changes nothing
    for m, s in zip(bn_r, stored):
        torch.testing.assert_close(m.running_mean, s, rtol=1e-5, atol=1e-6)
    # The running ones (3 epochs of momentum 0.1 on augmented batches) are elsewhere.
    assert max(float((a.running_mean - b.running_mean).abs().max()) for a, b in zip(bn_r, bn_n)) > 1e-3
    assert res_r.final_acc == students.evaluate(recomputed, x, np.repeat([0, 1], 8))


@pytest.fixture
def tiny_sets(monkeypatch):
    """Every real split and distilled set is the same four 8-px images (for sweeps whose trainer is faked)."""
    x, y = _images(4), np.array([0, 1, 0, 1])
    monkeypatch.setattr(evaluate, "real_split", lambda cfg, split: (x, y))
    monkeypatch.setattr(evaluate, "distilled_set", lambda cfg, home, m, ipc, g: (x, y))


def _result(epochs: int) -> TrainResult:
    return TrainResult(final_acc=50.0, best_acc=50.0, best_epoch=1, epochs=epochs, seconds=0.0, history=[])


def test_an_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="bn_stats must be 'recomputed' or 'running'"):
        _train("clean")


def test_the_setting_rekeys_only_batch_norm_students(tmp_path, monkeypatch, tiny_sets):
    """ConvNet records (instance norm) keep their keys; ResNet-18's are trained again, and the
    "running" key is the one runs had before the setting existed."""
    calls = []

    def fake_train(model, *args, epochs, bn_stats, **kw):
        calls.append((has_batch_norm(model), bn_stats))
        return _result(epochs)

    monkeypatch.setattr(training, "train_hard_label", fake_train)

    def run(**ev):
        cfg = config_from_dict({"name": "t", "ipc": [2], "dataset": {"image_size": 8}, "evaluation": {
            "students": ["convnet", "resnet18"], "generation_seeds": [0], **ev}})
        evaluate.train_students(cfg, tmp_path, "mgd3")

    run(bn_stats="running")
    assert calls == [(False, "running"), (True, "running")]
    calls.clear()
    run()  # default: recomputed
    assert calls == [(True, "recomputed")]
    calls.clear()
    run(bn_stats="running")
    assert calls == []
    cfg = config_from_dict({"name": "t"})
    spec = dict(method="m", ipc=1, gen_seed=0, student="s", protocol="hard", train_seed=0, epochs=1)
    old_key = evaluate._run_key(cfg, spec, "a", "b", None)  # the key before the setting existed
    running = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"bn_stats": "running"})})
    assert evaluate._run_key(running, spec, "a", "b", None, batch_norm=True) == old_key
    assert evaluate._run_key(cfg, spec, "a", "b", None, batch_norm=True) != old_key
    assert evaluate._run_key(cfg, spec, "a", "b", None, batch_norm=False) == old_key


@pytest.mark.parametrize("teacher, changes", [("convnet", False), ("resnet18", True)])
def test_the_teachers_version_follows_the_setting_only_with_batch_norm(teacher, changes):
    def version(bn_stats):
        return code_version(config_from_dict({"name": "t", "evaluation": {
            "bn_stats": bn_stats, "teacher": {"model": teacher}}}), "teacher")

    assert (version("running") != version("recomputed")) is changes


def test_soft_label_runs_keep_running_statistics_and_their_keys(tmp_path, monkeypatch, tiny_sets):
    monkeypatch.setattr(evaluate, "load_teacher", lambda cfg, home: build_student("convnet", 1, 2, 8, seed=0))
    calls = []

    def fake_soft(model, *args, epochs, bn_stats, **kw):
        calls.append(bn_stats)
        return _result(epochs)

    monkeypatch.setattr(training, "train_soft_label", fake_soft)
    for bn_stats in ("running", "recomputed"):
        cfg = config_from_dict({"name": "t", "ipc": [2], "dataset": {"image_size": 8}, "evaluation": {
            "students": ["resnet18"], "protocols": ["soft"], "generation_seeds": [0], "bn_stats": bn_stats}})
        evaluate.train_students(cfg, tmp_path, "mgd3")
    assert calls == ["running"]  # the second sweep found the first one's record


def test_one_students_hard_settings_apply_to_it_alone(tmp_path, monkeypatch, tiny_sets):
    calls = []

    def fake_train(model, *args, cfg, epochs, **kw):
        calls.append(("bn" if has_batch_norm(model) else "in", epochs, cfg.lr))
        return _result(epochs)

    monkeypatch.setattr(training, "train_hard_label", fake_train)

    def run(**ev):
        cfg = config_from_dict({"name": "t", "ipc": [1, 10], "dataset": {"image_size": 8}, "evaluation": {
            "students": ["convnet", "resnet18"], "generation_seeds": [0],
            "hard": {"lr": 0.02, "epochs_by_ipc": {1: 300, 10: 300}}, **ev}})
        evaluate.train_students(cfg, tmp_path, "mgd3")
        return cfg

    run()
    calls.clear()
    cfg = run(hard_by_student={"resnet18": {"epochs_by_ipc": {1: 300, 10: 100}}})
    # Only the run whose epochs changed trains again (ResNet-18 at IPC 10, 100 epochs, the shared
    # lr): a key holds its run's epochs, not the table, so ResNet-18's IPC 1 and the ConvNet's
    # runs are reused.
    assert calls == [("bn", 100, 0.02)]
    calls.clear()
    run(hard_by_student={"resnet18": {"epochs_by_ipc": {1: 300, 10: 100}, "lr": 0.01}})
    assert calls == [("bn", 300, 0.01), ("bn", 100, 0.01)]  # any other setting re-keys all its runs
    assert cfg.epochs_for_ipc(10, "hard", "resnet18") == 100 and cfg.epochs_for_ipc(10, "hard", "convnet") == 300
    teacher = config_from_dict({"name": "t", "evaluation": {"teacher": {"model": "resnet18"},
                                                             "hard_by_student": {"resnet18": {"full_data_epochs": 4}}}})
    assert teacher.teacher_epochs() == 4 and evaluate.teacher_is_full_data_run(teacher, "resnet18", 0)


def test_a_bad_student_setting_names_the_student_and_the_key():
    from mgd3_core.config import ConfigError

    with pytest.raises(ConfigError, match=r"hard_by_student\.resnet18: lr: Input should be greater than 0"):
        config_from_dict({"name": "t", "evaluation": {"hard_by_student": {"resnet18": {"lr": -1.0}}}})
    with pytest.raises(ConfigError, match=r"hard_by_student\.resnet18: epoch: Extra inputs are not permitted"):
        config_from_dict({"name": "t", "evaluation": {"hard_by_student": {"resnet18": {"epoch": 3}}}})
    with pytest.raises(ConfigError, match="hard_by_student.resnet50"):
        config_from_dict({"name": "t", "evaluation": {"hard_by_student": {"resnet50": {}}}})
