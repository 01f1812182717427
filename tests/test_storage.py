"""The storage layout (README "Layout", storage.py's docstring) and atomic writes: existing outputs stay findable,
and a failed write never leaves a half-written file under the real name."""

from __future__ import annotations

import pytest

from mgd3_core import storage
from mgd3_core.config import config_from_dict
from mgd3_core.files import atomic_output, atomic_write


def test_every_path_follows_the_readme_tree(tmp_path, monkeypatch):
    cfg = config_from_dict({"name": "exp1", "dataset": {"classes": ["3"]}})
    home = tmp_path / "home"
    rel = lambda p: p.relative_to(home).as_posix()  # noqa: E731
    assert rel(storage.embedded_backbone_dir(home, "abc")) == "backbones/embedded-abc"
    assert rel(storage.latent_store_file(cfg, home, "3", "vaefp")).startswith("latents/mnist5k-")
    assert rel(storage.latent_store_path(home, "ds", "fp", "3", split="test")) == "latents/ds/fp/3@test.h5"
    assert rel(storage.modes_file(cfg, home, "3")) == "runs/exp1/modes/3.h5"
    s = storage.distilled_set_dir(cfg, home, "mgd3", 10, 1)
    assert rel(s) == "runs/exp1/distilled/mgd3/ipc10/seed1"
    assert rel(storage.set_images_dir(s, "3")) == "runs/exp1/distilled/mgd3/ipc10/seed1/images/3"
    assert rel(storage.set_manifest_file(s, "3")) == "runs/exp1/distilled/mgd3/ipc10/seed1/manifest/3.csv"
    assert rel(storage.set_latents_file(s, "3")) == "runs/exp1/distilled/mgd3/ipc10/seed1/latents/3.h5"
    assert storage.set_of_png(storage.set_images_dir(s, "3") / "7.png") == (s, "3")
    assert rel(storage.teacher_weights_file(cfg, home)) == "runs/exp1/teacher/model.safetensors"
    assert rel(storage.students_file(cfg, home, "mgd3")) == "runs/exp1/students/mgd3.csv"
    assert rel(storage.student_runs_dir(cfg, home)) == "runs/exp1/students/runs"
    assert rel(storage.diversity_dir(cfg, home)) == "runs/exp1/diversity"
    assert rel(storage.report_dir(cfg, home)) == "runs/exp1/report"
    assert rel(storage.dagster_dir(home)) == "dagster"
    monkeypatch.setenv("MGD3_HOME", str(home))
    assert storage.storage_root() == home.resolve()


def test_a_path_component_that_escapes_the_store_is_refused(tmp_path):
    from mgd3_core.data import DatasetError

    with pytest.raises(DatasetError, match="class id"):
        storage.latent_store_path(tmp_path, "ds", "fp", "../escape")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "sub" / "report.md"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.md"]
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new" and oct(target.stat().st_mode & 0o777) == "0o644"
