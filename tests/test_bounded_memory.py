"""Bounded memory: batch sizes from a memory budget and the image size; splits stream from disk."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mgd3_core import evaluate
from mgd3_core.batching import MIB, SplitImages, activation_bytes, batch_size_for, digest, model_batch_size
from mgd3_core.config import HardLabelConfig, config_from_dict
from mgd3_core.data import SyntheticSource
from mgd3_core.students import build_student, penultimate_features
from mgd3_core.training import evaluate as evaluate_accuracy
from mgd3_core.training import train_hard_label


def test_larger_images_get_smaller_batches():
    sizes = (32, 64, 128)
    batches = {s: model_batch_size(build_student("convnet", 3, 10, s, seed=0), (3, s, s), 2048, training=False)
               for s in sizes}
    train = {s: model_batch_size(build_student("convnet", 3, 10, s, seed=0), (3, s, s), 2048, training=True)
             for s in sizes}
    assert batches[32] > batches[64] > batches[128], batches
    assert train[32] > train[64] > train[128], train
    # Activations grow with the pixel count: 4x the pixels, about a quarter of the batch.
    assert 3 <= batches[32] / batches[64] <= 5 and 3 <= batches[64] / batches[128] <= 5, batches
    assert all(train[s] < batches[s] for s in sizes)  # training keeps every activation


def test_a_256px_convnet_batch_fits_the_budget_instead_of_500_images():
    model = build_student("convnet", 3, 10, 256, seed=0)
    per_image = activation_bytes(model, (3, 256, 256), training=False)
    # The ConvNet-6's first activation alone is 128 x 256 x 256 float32 = 32 MiB per image.
    assert per_image >= 32 * MIB
    b = batch_size_for(2048, per_image)
    assert 1 <= b < 64 and b * per_image <= 2048 * MIB
    assert batch_size_for(1, 10 * MIB) == 1  # never zero, even when one image is over budget
    with pytest.raises(ValueError, match="memory_budget_mb"):
        batch_size_for(0, 1)


def test_evaluation_and_features_run_in_budget_sized_batches():
    model = build_student("convnet", 1, 2, 32, seed=0)
    budget = 4 * activation_bytes(model, (1, 32, 32), training=False) / MIB  # 4 images' worth
    seen: list[int] = []
    model.body.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))  # forward and features
    x = np.random.default_rng(0).integers(0, 256, (40, 1, 32, 32), dtype=np.uint8)
    evaluate_accuracy(model, x, np.zeros(40, int), memory_budget_mb=budget)
    assert max(seen) == 4 and sum(seen) == 40
    seen.clear()
    feats = penultimate_features(model, x, memory_budget_mb=budget)
    assert feats.shape[0] == 40 and max(seen) == 4


def _counting_source(n_per_class: int, n_classes: int = 2, size: int = 16):
    source = SyntheticSource(n_per_class, n_classes, image_size=size, channels=1)
    loads: list[int] = []
    inner = source._load

    def load(info, split, ids):
        loads.append(len(ids))
        return inner(info, split, ids)

    source._load = load
    return source, loads


def test_split_images_read_only_the_requested_items_in_order():
    source, loads = _counting_source(30)
    split = SplitImages(source, "train")
    assert len(split) == 60 and split.shape == (60, 1, 16, 16) and loads == []  # nothing read up front
    pos = [45, 3, 31, 3]
    batch = split[pos]
    want = np.concatenate([source.load(split.refs[p][0], "train", [split.refs[p][1]]) for p in pos])
    assert torch.equal(batch, torch.from_numpy(want))
    assert split.labels[pos].tolist() == [1, 0, 1, 0]
    # Streaming digest == digest of the materialized array.
    assert digest(split, split.labels) == digest(split[:].numpy(), split.labels)


def test_training_streams_the_split_and_matches_in_memory_training():
    source, loads = _counting_source(24)
    split, test = SplitImages(source, "train"), SplitImages(source, "test")
    cfg = HardLabelConfig(batch_size=16)
    a = build_student("convnet", 1, 2, 16, seed=0)
    budget = 8 * activation_bytes(a, (1, 16, 16), training=False) / MIB  # evaluation batches of 8
    kwargs = dict(cfg=cfg, epochs=1, seed=0, orientation_sensitive=False, evaluations=1, memory_budget_mb=budget)
    res_a = train_hard_label(a, split, split.labels, test, test.labels, **kwargs)
    # Never more than one training batch or one budget-sized evaluation batch read at once.
    assert loads and max(loads) <= cfg.batch_size
    b = build_student("convnet", 1, 2, 16, seed=0)
    res_b = train_hard_label(b, split[:], split.labels, test[:], test.labels, **kwargs)
    # Same instance of the data, same process, same ops: bit-identical.
    assert res_a.final_acc == res_b.final_acc
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_micro_batches_accumulate_to_the_same_update():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 1, 16, 16), dtype=np.uint8)
    y = rng.integers(0, 2, 32)
    cfg = HardLabelConfig(batch_size=16, cutmix_prob=1.0)
    models = []
    for micro in (None, 5):
        m = build_student("convnet", 1, 2, 16, seed=0)  # instance norm: per-image, so micro-batching is exact
        train_hard_label(m, x, y, x, y, cfg=cfg, epochs=2, seed=0, orientation_sensitive=False,
                         evaluations=1, micro_batch=micro)
        models.append(m)
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        # float32 sums in a different order: agreement to ~1e-6 relative after two epochs of SGD.
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_diversity_report_runs_the_teacher_on_the_evaluation_device(tmp_path, monkeypatch):
    cfg = config_from_dict({"name": "t", "ipc": [1], "methods": ["random_real"], "evaluation": {
        "device": "cuda:1", "generation_seeds": [0], "tsne_classes": 0, "representativeness_k": 1,
        "memory_budget_mb": 64}})
    moved, calls = [], []

    class Teacher(torch.nn.Linear):
        def to(self, *args, **kw):
            moved.append(args[0] if args else kw.get("device"))
            return self

    def fake_features(model, images, *, device=None, memory_budget_mb=None, batch_size=None):
        calls.append((device, memory_budget_mb))
        return np.random.default_rng(len(calls)).normal(size=(len(images), 3)).astype(np.float32)

    labels = np.array([0, 1, 0, 1])
    monkeypatch.setattr(evaluate, "load_teacher", lambda cfg, home: Teacher(1, 1))
    monkeypatch.setattr(evaluate, "real_split", lambda cfg, split: (np.zeros((4, 1, 8, 8), np.uint8), labels))
    monkeypatch.setattr(evaluate, "distilled_set", lambda *a: (np.zeros((2, 1, 8, 8), np.uint8), labels[:2]))
    import mgd3_core.students as students

    monkeypatch.setattr(students, "penultimate_features", fake_features)
    out = evaluate.diversity_report(cfg, tmp_path)
    assert moved == ["cuda:1"]
    assert calls and all(c == ("cuda:1", 64) for c in calls)
    assert isinstance(out["summary"], pd.DataFrame)
