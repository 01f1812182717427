"""Nothing stale: per-class image content and per-method settings reach exactly their partitions.

- the content key of an ImageFolder class follows its files' bytes, cheaply;
- an edited image makes (and ``make demo`` re-encodes) that class's latent store only;
- a sampler change makes the diffusion methods' distilled partitions stale, not the real-image ones.

(The embedded backbone's key, which covers the training thread count and CPU kernels, is tested in
tests/test_embedded_training.py.)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import yaml
from PIL import Image

from mgd3_assets import demo
from mgd3_core import dataset_content
from mgd3_core.backbones import embedded_backbone_dir
from mgd3_core.config import DIFFUSION_METHODS, DatasetConfig
from mgd3_core.data import open_dataset
from mgd3_core.dataset_content import class_content_key
from tests.dagster_helpers import build_defs, latest_materialization, tiny_config, write_config


def _png(path: Path, seed: int, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(path)


def _image_tree(root: Path, per_class: int = 6) -> Path:
    for c in ("0", "1"):
        for i in range(per_class):
            _png(root / "train" / c / f"{i}.png", seed=100 * int(c) + i)
        for i in range(2):
            _png(root / "val" / c / f"{i}.png", seed=1000 + 100 * int(c) + i)
    return root


def _replace_keeping_size_and_mtime(path: Path, seed: int) -> None:
    """Another image of the same size, with the old mtime restored (as ``cp -p`` would)."""
    st = path.stat()
    _png(path, seed)
    assert path.stat().st_size == st.st_size  # 16x16 random gray PNGs: same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# --------------------------------------------------------------------------- the content key
def test_class_content_key_follows_file_bytes_and_reads_only_changed_files(tmp_path, monkeypatch):
    root = _image_tree(tmp_path / "images")
    source = open_dataset(DatasetConfig(kind="imagefolder", root=str(root), image_size=16))
    cache = {c: tmp_path / "cache" / f"{c}.json" for c in ("0", "1")}
    key = {c: class_content_key(source, c, cache[c]) for c in ("0", "1")}
    assert key["0"] != key["1"] and all(p.is_file() for p in cache.values())

    reads = []
    real_hash = dataset_content._file_sha256
    monkeypatch.setattr(dataset_content, "_file_sha256", lambda p: reads.append(p.name) or real_hash(p))
    assert class_content_key(source, "1", cache["1"]) == key["1"] and reads == []  # nothing read again

    os.utime(root / "train" / "1" / "3.png")  # touched only: read again, same bytes, same key
    assert class_content_key(source, "1", cache["1"]) == key["1"] and reads == ["3.png"]

    _replace_keeping_size_and_mtime(root / "train" / "1" / "3.png", seed=7)
    edited = class_content_key(source, "1", cache["1"])
    assert edited != key["1"]
    assert class_content_key(source, "0", cache["0"]) == key["0"]  # per class: class 0 unchanged

    _png(root / "val" / "1" / "new.png", seed=8)  # an added test image changes the class's content too
    assert class_content_key(source, "1", cache["1"]) == edited  # a source lists a class once: not seen yet
    source = open_dataset(DatasetConfig(kind="imagefolder", root=str(root), image_size=16))  # as each run does
    assert class_content_key(source, "1", cache["1"]) not in (key["1"], edited)
    cache["1"].write_text("{not json")  # a damaged cache is ignored: every file is hashed again
    assert class_content_key(source, "1", None) == class_content_key(source, "1", cache["1"])


def test_a_packaged_dataset_is_keyed_by_its_dataset_key():
    a = open_dataset(DatasetConfig(classes=["3"], max_per_class=12))
    b = open_dataset(DatasetConfig(classes=["3"], max_per_class=13))
    assert a.class_folders("3") == {}
    assert class_content_key(a, "3") == class_content_key(a, "3") != class_content_key(b, "3")


# --------------------------------------------------------------------------- through Dagster
def _copied_instance(tiny_graph, tmp_path: Path) -> dg.DagsterInstance:
    """A private copy of the tiny graph's instance (its runs and data versions), to change freely."""
    storage = tmp_path / "dagster_storage"
    shutil.copytree(tiny_graph.root / "dagster_storage", storage)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "storage": {"sqlite": {"base_dir": str(storage)}}, "telemetry": {"enabled": False},
        "concurrency": {"pools": {"default_limit": 1}},
    }))
    return dg.DagsterInstance.from_config(str(home))


def _stage(name: str) -> demo.Stage:
    (stage,) = [s for s in demo.STAGES if name in s.assets]
    return stage


def test_a_sampler_change_makes_only_the_diffusion_methods_stale(tiny_graph, tmp_path):
    changed = build_defs(write_config(tmp_path / "sampler.yaml", tiny_config(
        sampler={"steps": 5, "t_stop": 2, "batch_size": 16})), tiny_graph.home)
    distill = _stage("distilled_images")
    with _copied_instance(tiny_graph, tmp_path) as instance:
        assert demo.plan_stage(tiny_graph.defs, instance, distill) == []
        demo.run_stage(changed, instance, _stage("method_settings"), log=lambda m: None)  # as make demo does
        plan = demo.plan_stage(changed, instance, distill)
        # Dagster's own staleness: the diffusion methods' partitions only; the real-image methods
        # and decoded centroids keep their images.
        diffusion = [m for m in tiny_config()["methods"] if m in DIFFUSION_METHODS]
        assert diffusion and len(diffusion) < len(tiny_config()["methods"])
        # One run per diffusion method, holding both classes (runs.classes_per_run "auto").
        assert sorted((pk.start, pk.end) for pk, _ in plan) == sorted((f"0|{m}", f"1|{m}") for m in diffusion)
        assert demo.plan_stage(changed, instance, _stage("latent_store")) == []
        assert demo.plan_stage(changed, instance, _stage("backbone")) == []


@pytest.mark.slow
def test_an_edited_image_reencodes_only_its_class(tiny_graph, tmp_path):
    root = _image_tree(tmp_path / "images")
    backbone_dir = str(embedded_backbone_dir(tiny_graph.cfg, tiny_graph.home))  # knows labels 0 and 1
    raw = tiny_config(backbone={"kind": "pretrained", "transformer_dir": backbone_dir, "vae_dir": backbone_dir},
                      dataset={"kind": "imagefolder", "root": str(root)})
    defs = build_defs(write_config(tmp_path / "folder.yaml", raw), tmp_path / "home")
    stages = demo.STAGES[:demo.STAGES.index(_stage("latent_store")) + 1]  # observations, then the stores
    quiet = {"log": lambda m: None, "log_level": "WARNING"}
    with dg.DagsterInstance.ephemeral() as instance:
        demo.materialize_graph(defs, instance, stages=stages, **quiet)
        stores = {c: Path(latest_materialization(instance, "latent_store", c).metadata["path"].value) for c in "01"}
        stamps = {c: stores[c].stat().st_mtime_ns for c in "01"}
        demo.materialize_graph(defs, instance, stages=stages[:1], **quiet)  # re-observed, nothing changed
        assert demo.plan_stage(defs, instance, stages[-1]) == []

        _replace_keeping_size_and_mtime(root / "train" / "1" / "2.png", seed=99)
        demo.materialize_graph(defs, instance, stages=stages[:1], **quiet)
        assert demo.plan_stage(defs, instance, stages[-1]) == [("1", [dg.AssetKey("latent_store")])]
        reports = demo.materialize_graph(defs, instance, stages=stages, **quiet)
        assert reports[-1].partitions == ["1"]
        assert stores["1"].stat().st_mtime_ns != stamps["1"]  # re-encoded (the core did not reuse it)
        assert stores["0"].stat().st_mtime_ns == stamps["0"]
        assert demo.plan_stage(defs, instance, stages[-1]) == []  # both classes up to date again
