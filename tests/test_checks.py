"""The blocking asset checks: each fails on a deliberately broken partition, and a failed
check stops the assets downstream of it in the same run.

The broken files belong to the session's tiny graph; every test restores them,
and runs in its own ephemeral instance so the shared instance keeps passing checks.
"""

import shutil
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import h5py
import numpy as np
import pytest

from mgd3_core import pipeline, storage
from tests.dagster_helpers import latest_materialization

pytestmark = pytest.mark.slow


@contextmanager
def restored(*paths: Path):
    """Put the files (or directories) back as they were, whatever the test did to them."""
    saved = []
    for p in paths:
        backup = p.with_name(p.name + ".test-backup")
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, backup)
        saved.append((p, backup))
    try:
        yield
    finally:
        for p, backup in saved:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            backup.rename(p)


JOB_OF_CHECK = {"latent_store_complete": "encode_job", "centroids_valid": "modes_job",
                "distilled_complete": "distill_job"}


def _run_check(graph, check_name: str, partition_key: str) -> dg.AssetCheckEvaluation:
    """Execute one check alone (not its asset) in an ephemeral instance; its evaluation."""
    job = graph.defs.resolve_job_def(JOB_OF_CHECK[check_name])
    checks = {k for k in graph.defs.resolve_asset_graph().asset_check_keys if k.name == check_name}
    result = job.get_subset(asset_selection=set(), asset_check_selection=checks).execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), partition_key=partition_key, raise_on_error=False)
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def _latent_store(graph, class_id: str) -> Path:
    return Path(latest_materialization(graph.instance, "latent_store", class_id).metadata["path"].value)


def test_checks_pass_on_intact_partitions(tiny_graph):
    assert _run_check(tiny_graph, "latent_store_complete", "1").passed
    assert _run_check(tiny_graph, "centroids_valid", "1").passed
    assert _run_check(tiny_graph, "distilled_complete", "1|mgd3").passed


def test_latent_store_check_fails_on_a_non_finite_latent(tiny_graph):
    path = _latent_store(tiny_graph, "1")
    with restored(path):
        with h5py.File(path, "r+") as f:
            f["latents"][3, 0, 0, 0] = np.nan
        evaluation = _run_check(tiny_graph, "latent_store_complete", "1")
    assert not evaluation.passed and "NaN" in evaluation.description


def test_centroid_check_fails_on_a_missing_centroid(tiny_graph):
    path = storage.modes_file(tiny_graph.cfg, tiny_graph.home, "1")
    with restored(path):
        with h5py.File(path, "r+") as f:
            g = f["ipc2/seed0"]
            one = g["centroids"][:1]
            del g["centroids"]
            g.create_dataset("centroids", data=one)  # 1 centroid where IPC = 2
        evaluation = _run_check(tiny_graph, "centroids_valid", "1")
    assert not evaluation.passed and "IPC" in evaluation.description


@pytest.mark.parametrize("damage", ["missing_png", "unlisted_png", "edited_png"])
def test_distilled_check_fails_on_a_broken_partition(tiny_graph, damage):
    sdir = storage.distilled_set_dir(tiny_graph.cfg, tiny_graph.home, "mgd3", 2, 0)
    images = sdir / "images" / "1"
    with restored(images):
        if damage == "missing_png":
            (images / "1.png").unlink()
        elif damage == "unlisted_png":
            shutil.copy(images / "0.png", images / "2.png")
        else:
            (images / "0.png").write_bytes((images / "1.png").read_bytes())
        evaluation = _run_check(tiny_graph, "distilled_complete", "1|mgd3")
        assert not evaluation.passed, damage
    assert _run_check(tiny_graph, "distilled_complete", "1|mgd3").passed  # restored


def test_a_failed_blocking_check_stops_the_downstream_asset(tiny_graph, monkeypatch):
    """An encoder that leaves a corrupt store: latent_store materializes, its check (evaluated by
    the asset's own run) fails, the run fails, and mode_centroids is not run after it."""
    encode = pipeline.encode_latents

    def encode_then_corrupt(cfg, home, class_id, progress=None):
        info = encode(cfg, home, class_id)
        with h5py.File(info.path, "r+") as f:
            f["latents"][0] = np.inf
        return info

    path = _latent_store(tiny_graph, "1")
    job = tiny_graph.defs.resolve_job_def("encode_job")
    with restored(path):
        monkeypatch.setattr(pipeline, "encode_latents", encode_then_corrupt)
        result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), partition_key="1",
                                        raise_on_error=False)
    assert not result.success
    materialized = [e.event_specific_data.materialization.asset_key.to_user_string()
                    for e in result.get_asset_materialization_events()]
    assert materialized == ["latent_store"]
    failed = [e.asset_check_key.name for e in result.get_asset_check_evaluations() if not e.passed]
    assert failed == ["latent_store_complete"]
    assert [e.partition for e in result.get_asset_check_evaluations()] == ["1"]
