"""The whole asset graph on the tiny experiment, in a temporary persistent instance.

One session-wide materialization (``tiny_graph``) is shared with the check and
browser tests; the incremental case builds its own small instance.
"""

import base64
import os
import re
import socket
import subprocess
from pathlib import Path

import dagster as dg
import pytest

from mgd3_assets import demo
from mgd3_core import backbones, pipeline, storage
from mgd3_core.backbones import embedded_backbone_dir
from mgd3_core.distilled import lineage_of
from mgd3_core.latents import validate_latent_store
from tests.dagster_helpers import (
    DATA_VERSION_TAG,
    all_partitions,
    build_defs,
    evaluate,
    latest_materialization,
    materialized_partitions,
    tiny_config,
    write_config,
)

pytestmark = pytest.mark.slow


def _meta(mat, key):
    return mat.metadata[key].value


def test_every_asset_partition_is_materialized_and_every_check_passed(tiny_graph):
    instance, defs = tiny_graph.instance, tiny_graph.defs
    for asset, pks in all_partitions(defs).items():
        assert materialized_partitions(instance, asset) == set(pks), asset
    graph = defs.resolve_asset_graph()
    for check_key in graph.asset_check_keys:
        records = instance.event_log_storage.get_asset_check_execution_history(check_key, limit=100)
        assert records and all(r.evaluation.passed for r in records if r.evaluation), check_key
    assert sum(r.runs for r in tiny_graph.stage_reports) == 1 + 2 + 4 + 1 + 2 + 1


def test_stores_carry_their_content_hash_as_data_version(tiny_graph):
    cfg, home, instance = tiny_graph.cfg, tiny_graph.home, tiny_graph.instance
    backbone = latest_materialization(instance, "backbone")
    assert backbone.tags[DATA_VERSION_TAG] == pipeline.backbone_fingerprint(cfg, home) == _meta(backbone, "fingerprint")
    for class_id in ("0", "1"):
        mat = latest_materialization(instance, "latent_store", class_id)
        info = validate_latent_store(Path(_meta(mat, "path")))
        assert mat.tags[DATA_VERSION_TAG] == info.content_hash
        assert info.vae_fingerprint == _meta(backbone, "vae_fingerprint")


def test_mode_centroids_show_counts_per_mode_and_the_closest_real_images(tiny_graph):
    mat = latest_materialization(tiny_graph.instance, "mode_centroids", "1")
    rows = _meta(mat, "counts_per_mode").records
    assert [r.data["mode"] for r in rows] == [0, 1]  # IPC 2, one seed
    assert sum(r.data["count"] for r in rows) == 12  # every training latent of the class
    assert "data:image/png;base64," in _meta(mat, "closest_real_images")


@pytest.mark.parametrize("method", ["mgd3", "random_real"])
def test_distilled_images_carry_a_lineage_table_and_a_small_thumbnail_grid(tiny_graph, method):
    cfg, home = tiny_graph.cfg, tiny_graph.home
    mat = latest_materialization(tiny_graph.instance, "distilled_images", f"0|{method}")
    rows = [r.data for r in _meta(mat, "lineage").records]
    assert len(rows) == 2 and [r["mode_index"] for r in rows if method == "mgd3"] in ([0, 1], [])
    for r in rows:
        assert r["dist_to_mode"] >= 0 and r["ipc"] == 2 and r["gen_seed"] == 0
        assert (r["seed"] is not None) == (method == "mgd3")  # sampling seed for diffusion methods
        assert (r["source_item"] is not None) == (method == "random_real")  # source image for real ones
        # The metadata row and the manifest row of the same PNG agree (lineage_of reads the manifest).
        png = storage.distilled_root(cfg, home) / r["image"]
        lineage = lineage_of(png)
        assert lineage["verified"] and int(lineage["mode_index"]) == r["mode_index"]
        assert lineage["backbone_fingerprint"] == _meta(mat, "backbone_fingerprint")
    md = _meta(mat, "thumbnails")
    png_b64 = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", md).group(1)
    assert base64.b64decode(png_b64)[:8] == b"\x89PNG\r\n\x1a\n" and len(md) < 8_000  # a few KB


def test_reports_list_every_method_and_the_full_data_bound(tiny_graph):
    mat = latest_materialization(tiny_graph.instance, "evaluation_report")
    table = _meta(mat, "results_table")
    for method in ("full_data", "mgd3", "random_real"):
        assert f"| {method} |" in table
    assert Path(_meta(mat, "report_html")).is_file()
    students = latest_materialization(tiny_graph.instance, "students", "mgd3")
    assert len(_meta(students, "runs").records) == 1  # one IPC x seed x student x protocol
    assert "| mgd3 |" in demo.results_text(tiny_graph.instance)


def test_rerunning_with_an_unchanged_backbone_reruns_nothing(tiny_graph):
    """The backbone is re-materialized (reusing its checkpoint): same fingerprint, nothing unsynced."""
    defs, instance = tiny_graph.defs, tiny_graph.instance
    reports = demo.materialize_graph(defs, instance, stages=demo.STAGES[:1], force=True, log=lambda m: None)
    assert reports[0].runs == 1
    assert all(demo.plan_stage(defs, instance, s) == [] for s in demo.STAGES)
    cursor = evaluate(defs, instance).cursor
    assert evaluate(defs, instance, cursor).total_requested == 0


def test_adding_a_class_materializes_only_that_class(tiny_graph, tmp_path, monkeypatch):
    """With a backbone that knows both digits (the tiny graph's, used as a pretrained one), a config
    that grows from class "0" to "0", "1" runs only class "1"'s per-class partitions. (That the
    gathering assets then run once more is covered in test_automation.py.)"""
    backbone_dir = str(embedded_backbone_dir(tiny_graph.cfg, tiny_graph.home))
    pretrained = {"kind": "pretrained", "transformer_dir": backbone_dir, "vae_dir": backbone_dir}
    home = tmp_path / "home"
    one = build_defs(write_config(tmp_path / "one.yaml",
                                  tiny_config(backbone=pretrained, dataset={"classes": ["0"]})), home)
    two = build_defs(write_config(tmp_path / "two.yaml", tiny_config(backbone=pretrained)), home)
    per_class = demo.STAGES[:3]  # backbone observation, latent_store + mode_centroids, distilled_images
    loads, real_load = [], backbones.load_backbone

    def counting_load(*args):
        loads.append(args)
        return real_load(*args)

    monkeypatch.setattr(backbones, "load_backbone", counting_load)
    with dg.DagsterInstance.ephemeral() as instance:
        demo.materialize_graph(one, instance, stages=per_class, log=lambda m: None)
        mark = instance.event_log_storage.get_maximum_record_id()
        latent_0 = Path(_meta(latest_materialization(instance, "latent_store", "0"), "path"))
        stamp = latent_0.stat().st_mtime_ns

        assert demo.plan_stage(two, instance, demo.STAGES[1]) == [("1", [dg.AssetKey("latent_store"),
                                                                       dg.AssetKey("mode_centroids")])]
        reports = demo.materialize_graph(two, instance, stages=per_class, log=lambda m: None)

        new = {(r.asset_key.to_user_string(), r.partition_key)
               for asset in ("backbone", "latent_store", "mode_centroids", "distilled_images")
               for r in instance.fetch_materializations(
                   dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), after_storage_id=mark), limit=100).records}
        assert new == {("latent_store", "1"), ("mode_centroids", "1"),
                       ("distilled_images", "1|mgd3"), ("distilled_images", "1|random_real")}
        assert [r.runs for r in reports] == [1, 1, 2]  # the backbone is re-observed, not re-run
        assert latent_0.stat().st_mtime_ns == stamp  # class 0's store untouched
        assert materialized_partitions(instance, "distilled_images") == set(all_partitions(two)["distilled_images"])
    # In one process the backbone is loaded once and reused by every partition of both runs.
    assert len(loads) == 1


def test_runs_of_a_killed_demo_release_the_accelerator(tmp_path):
    """A demo killed with SIGKILL leaves its run 'started' and holding the accelerator slot;
    the next demo ends such runs (dead process on this host) and leaves live ones alone."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    overrides = {"concurrency": {"pools": {"default_limit": 1}}}
    with dg.instance_for_test(temp_dir=str(tmp_path), overrides=overrides) as instance:
        for name, pid in (("dead", dead.pid), ("alive", os.getpid())):
            instance.add_run(dg.DagsterRun(
                job_name="distill_job", run_id=f"{name}-run", status=dg.DagsterRunStatus.STARTED,
                tags={demo.LAUNCHED_BY: "demo", demo.PID: str(pid), demo.HOST: socket.gethostname()}))
        instance.event_log_storage.initialize_concurrency_limit_to_default("accelerator")
        assert instance.event_log_storage.claim_concurrency_slot("accelerator", "dead-run", "step").is_claimed

        assert demo.release_abandoned_runs(instance, log=lambda m: None) == ["dead-run"]
        assert instance.get_run_by_id("dead-run").status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id("alive-run").status == dg.DagsterRunStatus.STARTED
        assert instance.event_log_storage.get_concurrency_info("accelerator").active_slot_count == 0
