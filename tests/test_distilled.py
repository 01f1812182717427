"""Distilled-set writer: ImageFolder layout, atomic classes, manifest, lineage lookup."""

import os

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

from mgd3_core import distilled as D
from mgd3_core import images, storage


def _rows(k, cls="3"):
    return [{"method": "mgd3", "ipc": k, "gen_seed": 0, "class_id": cls, "class_name": "three",
             "class_label": 3, "mode_index": i, "seed": 100 + i, "lambda": 0.1, "t_stop": 25,
             "backbone_fingerprint": "abc"} for i in range(k)]


def _images(k, seed=0, c=1):
    return np.random.default_rng(seed).integers(0, 256, (k, c, 8, 8), dtype=np.uint8)


def test_writes_an_imagefolder_readable_set_with_manifest_and_latents(tmp_path):
    root = storage.set_dir(tmp_path, "mgd3", 4, 0)
    for cls in ("3", "7"):
        D.write_distilled_class(root, cls, _images(4), np.zeros((4, 2, 2, 2)), _rows(4, cls))
    ds = ImageFolder(root / "images")
    assert ds.classes == ["3", "7"] and len(ds) == 8
    imgs, rows = D.load_distilled_class(root, "3")
    assert np.array_equal(imgs, _images(4))
    assert [r["file"] for r in rows] == [f"{i}.png" for i in range(4)]
    assert (root / "latents" / "3.h5").is_file()


def test_rewrite_replaces_the_class_and_staging_never_shows_in_imagefolder(tmp_path):
    root = storage.set_dir(tmp_path, "unguided", 2, 1)
    D.write_distilled_class(root, "3", _images(3), None, _rows(3))
    D.write_distilled_class(root, "3", _images(2, seed=1), None, _rows(2))
    assert sorted(p.name for p in (root / "images" / "3").iterdir()) == ["0.png", "1.png"]
    assert ImageFolder(root / "images").classes == ["3"]
    assert not any((root / ".staging").iterdir())


def test_a_crash_before_the_manifest_leaves_the_class_incomplete(tmp_path, monkeypatch):
    root = storage.set_dir(tmp_path, "mgd3", 2, 0)
    D.write_distilled_class(root, "3", _images(2), None, _rows(2))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(D, "atomic_write", boom)
    with pytest.raises(OSError):
        D.write_distilled_class(root, "3", _images(2, seed=5), None, _rows(2))
    with pytest.raises(D.DistilledSetError, match="incomplete"):
        D.read_manifest(root, "3")


def test_lineage_answers_which_mode_and_seed_made_a_png(tmp_path):
    root = storage.set_dir(tmp_path, "mgd3", 3, 0)
    D.write_distilled_class(root, "3", _images(3), None, _rows(3))
    info = D.lineage_of(root / "images" / "3" / "2.png")
    assert info["mode_index"] == "2" and info["seed"] == "102" and info["class_name"] == "three"
    assert info["backbone_fingerprint"] == "abc" and info["verified"] is True
    (root / "images" / "3" / "2.png").write_bytes(images.png_bytes(_images(1, seed=9)[0]))
    assert D.lineage_of(root / "images" / "3" / "2.png")["verified"] is False
    with pytest.raises(D.DistilledSetError, match="not inside a distilled set"):
        D.lineage_of(tmp_path / "x.png")


def test_mismatched_counts_are_refused(tmp_path):
    with pytest.raises(D.DistilledSetError, match="must all match"):
        D.write_distilled_class(tmp_path, "3", _images(3), None, _rows(2))


def test_png_bytes_are_deterministic_and_rgb_supported():
    img = _images(1, c=3)[0]
    assert images.png_bytes(img) == images.png_bytes(img.copy())
    x = torch.tensor([[[[-1.0, 0.0, 1.0, 2.0]]]])
    assert images.to_uint8(x).tolist() == [[[[0, 128, 255, 255]]]]
