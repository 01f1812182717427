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
import numpy as np
import pandas as pd
import pytest

from mgd3_assets import demo
from mgd3_core import backbones, pipeline, storage
from mgd3_core import evaluate as core_evaluate
from mgd3_core.backbones import embedded_backbone_dir
from mgd3_core.config import ALL_METHODS
from mgd3_core.distilled import lineage_of
from mgd3_core.latents import validate_latent_store
from mgd3_core.students import evaluate as evaluate_student
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
        # One result per partition, evaluated by the asset's own run (no check-only runs).
        node = graph.get(check_key.asset_key)
        assert {r.partition for r in records} == set(node.partitions_def.get_partition_keys()), check_key
        asset_runs = {r.run_id for r in instance.fetch_materializations(check_key.asset_key, limit=100).records}
        assert {r.run_id for r in records} <= asset_runs, check_key
    # inputs observed (dataset, method settings), backbone, both classes' latent stores in one run,
    # their modes in one run, one run per method (both classes), teacher + full data, 6 students,
    # reports: the tiny graph's runs of classes_per_run "auto" hold every class.
    assert [r.runs for r in tiny_graph.stage_reports if r.in_graph] == [1, 1, 1, 1, 1, 6, 1, 6, 1]
    # One backbone load per run that needs it: the backbone, the stores, 4 methods that sample or decode.
    assert sorted(tiny_graph.backbone_loads) == sorted(
        ["backbone", "latent_store"] + ["distilled_images"] * 3 + ["distilled_images"]), tiny_graph.backbone_loads


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


def _rounded(value, digits):
    return not isinstance(value, float) or value == round(value, digits)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_distilled_images_carry_a_lineage_table_and_a_small_thumbnail_grid(tiny_graph, method):
    """Every method's partition shows each image's full lineage (the manifest's columns, floats
    rounded for reading) and a thumbnail grid; the table agrees with the manifest file."""
    cfg, home = tiny_graph.cfg, tiny_graph.home
    mat = latest_materialization(tiny_graph.instance, "distilled_images", f"0|{method}")
    table = _meta(mat, "lineage")
    columns = {c.name for c in table.schema.columns}
    assert {"mode_index", "mode_count", "dist_to_mode", "dist_to_nearest_other_mode", "seed", "lambda", "t_stop",
            "cfg_scale", "steps", "sampler", "backbone_fingerprint", "class_name"} <= columns
    rows = [r.data for r in table.records]
    assert len(rows) == 2  # IPC 2, one generation seed
    diffusion = method in ("mgd3", "unguided", "mgd3_no_stop")
    sampler = cfg.sampler_for(method) if diffusion else None
    for r in rows:
        assert r["dist_to_mode"] >= 0 and r["ipc"] == 2 and r["gen_seed"] == 0 and r["class_name"] == "zero"
        assert all(_rounded(v, 3) for v in r.values()), r  # numbers rounded for reading
        assert r["mode_count"] >= 1 and r["backbone_fingerprint"] == _meta(mat, "backbone_fingerprint") != ""
        assert (r["seed"] is not None) == diffusion  # sampling seed for diffusion methods
        assert (r["source_item"] is not None) == (method in ("random_real", "closest_real"))
        if diffusion:  # the settings that made it: unguided is lambda 0, no-stop is t_stop 0
            assert (r["lambda"], r["t_stop"], r["cfg_scale"], r["steps"], r["sampler"]) == (
                sampler.guidance_strength, sampler.t_stop, sampler.cfg_scale, sampler.steps, sampler.kind)
        else:
            assert r["lambda"] is None and r["sampler"] is None
        # The metadata row and the manifest row of the same PNG agree (lineage_of reads the manifest).
        png = storage.distilled_root(cfg, home) / r["image"]
        lineage = lineage_of(png)
        assert lineage["verified"] and lineage["method"] == method
        assert int(lineage["mode_index"]) == r["mode_index"] and int(lineage["mode_count"]) == r["mode_count"]
        assert abs(float(lineage["dist_to_mode"]) - r["dist_to_mode"]) <= 5e-4  # rounded to 3 decimals
        assert lineage["backbone_fingerprint"] == r["backbone_fingerprint"]
    if method not in ("random_real",):  # one image per mode, in mode order
        assert [r["mode_index"] for r in rows] == [0, 1]
    md = _meta(mat, "thumbnails")
    png_b64 = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", md).group(1)
    assert base64.b64decode(png_b64)[:8] == b"\x89PNG\r\n\x1a\n" and len(md) < 8_000  # a few KB


def test_reports_list_every_method_and_protocol_and_the_full_data_bound(tiny_graph):
    cfg, instance = tiny_graph.cfg, tiny_graph.instance
    mat = latest_materialization(instance, "evaluation_report")
    table = _meta(mat, "results_table")
    assert "| hard | convnet | all | full_data |" in table
    n_test = len(core_evaluate.real_split(cfg, "test")[1])
    results = pd.read_csv(storage.report_dir(cfg, tiny_graph.home) / "results.csv")
    for method in ALL_METHODS:
        for protocol in ("hard", "soft"):
            assert f"| {protocol} | convnet | 2 | {method} |" in table, (method, protocol)
        students = latest_materialization(instance, "students", method)
        runs = [r.data for r in _meta(students, "runs").records]
        assert sorted(r["protocol"] for r in runs) == ["hard", "soft"]  # one IPC x seed x student each
        for r in runs:
            assert _rounded(r["final_acc"], 2)
            # a top-1 accuracy in percent over the whole test split: k of n_test images correct
            correct = r["final_acc"] * n_test / 100
            assert abs(correct - round(correct)) <= 0.005 * n_test / 100 + 1e-9, (method, r["final_acc"], n_test)
            # and the report shows the run's own figure
            row = results[(results["method"] == method) & (results["protocol"] == r["protocol"])]
            assert len(row) == 1 and row["final_acc"].iloc[0] == pytest.approx(r["final_acc"], abs=0.006)
    assert Path(_meta(mat, "report_html")).is_file()
    summary = [r.data for r in _meta(mat, "summary").records]
    assert all(_rounded(v, 3) for r in summary for v in r.values())  # report tables rounded for reading
    diversity = [r.data for r in _meta(latest_materialization(instance, "diversity_report"), "summary").records]
    assert {r["method"] for r in diversity} == set(ALL_METHODS)
    assert all(_rounded(v, 3) for r in diversity for v in r.values())
    assert "| mgd3 |" in demo.results_text(instance)


def test_soft_labels_come_from_the_named_teacher_asset(tiny_graph):
    """The teacher asset is the configured ResNet-18; soft-label students read it (their run
    records are keyed by its weights), and the ConvNet full-data bound is its own run."""
    cfg, home, instance = tiny_graph.cfg, tiny_graph.home, tiny_graph.instance
    teacher = latest_materialization(instance, "teacher")
    assert _meta(teacher, "student") == "resnet18"
    model = core_evaluate.load_teacher(cfg, home)
    assert type(model).__name__ == "ResNet" and not model.training
    # The stored teacher is the one whose accuracy the asset reports (its batch-norm statistics
    # included): evaluated again on the test split it scores exactly that.
    x_test, y_test = core_evaluate.real_split(cfg, "test")
    again = evaluate_student(model, x_test, y_test, memory_budget_mb=cfg.evaluation.memory_budget_mb)
    assert again == pytest.approx(_meta(teacher, "final_acc"), abs=0.006)
    results = pd.read_csv(storage.report_dir(cfg, home) / "results.csv")
    soft = results[results["protocol"] == "soft"]
    assert sorted(soft["method"]) == sorted(ALL_METHODS)
    assert (soft["epochs"] == cfg.evaluation.soft.epochs).all()
    full = results[results["method"] == "full_data"]
    assert list(full["student"]) == ["convnet"] and (full["seconds"] > 0).all()
    assert not core_evaluate.teacher_is_full_data_run(cfg, "convnet", 0)


def test_dd_ranking_scores_use_the_best_of_the_last_evaluations(tiny_graph):
    """IOR in the report = mean ranking accuracy of the method - that of random real images,
    where a run's ranking accuracy is its best test evaluation in the last fifth of training."""
    cfg, home = tiny_graph.cfg, tiny_graph.home
    results = pd.read_csv(storage.report_dir(cfg, home) / "results.csv")
    assert (results["ranking_acc"] >= results["final_acc"]).all()
    assert (results["ranking_acc"] <= results["best_acc"]).all()
    summary = pd.read_csv(storage.report_dir(cfg, home) / "summary.csv")
    hard = results[results["protocol"] == "hard"].groupby("method")["ranking_acc"].mean()
    row = summary[(summary["method"] == "mgd3") & (summary["protocol"] == "hard")].iloc[0]
    assert row["ior"] == pytest.approx(hard["mgd3"] - hard["random_real"], abs=1e-9)  # float64 sums
    assert row["hlr"] == pytest.approx(hard["full_data"] - hard["mgd3"], abs=1e-9)
    assert "best test accuracy over the evaluations in the last fifth" in (
        storage.report_dir(cfg, home) / "report.md").read_text()


def test_the_tsne_path_embeds_every_method_next_to_real_images(tiny_graph):
    cfg, home, instance = tiny_graph.cfg, tiny_graph.home, tiny_graph.instance
    diversity = latest_materialization(instance, "diversity_report")
    tsne = pd.read_csv(_meta(diversity, "tsne_csv"))
    assert set(tsne["method"]) == {"real", *ALL_METHODS}
    assert (tsne[tsne["method"] != "real"].groupby("method").size() == 2).all()  # IPC 2, one class shown
    assert np.isfinite(tsne[["x", "y"]].to_numpy()).all()
    report_md = (storage.report_dir(cfg, home) / "report.md").read_text()
    assert "(tsne_ipc2.png)" in report_md and (storage.report_dir(cfg, home) / "tsne_ipc2.png").stat().st_size > 0


def test_rerunning_with_an_unchanged_backbone_reruns_nothing(tiny_graph):
    """The backbone is re-materialized (reusing its checkpoint): same fingerprint, nothing unsynced."""
    defs, instance = tiny_graph.defs, tiny_graph.instance
    reports = demo.materialize_graph(defs, instance, stages=demo.STAGES[:3], force=True, log=lambda m: None)
    assert [r.runs for r in reports] == [1, 1, 1]  # inputs re-observed, backbone re-materialized
    assert all(demo.plan_stage(defs, instance, s) == [] for s in demo.STAGES[len(demo.INPUT_STAGES):])
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
    # inputs and backbone observed, latent_store, mode_centroids, (variant_modes: none here), distilled_images
    per_class = demo.STAGES[:demo.STAGES.index(demo.stage_of("distilled_images")) + 1]
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

        assert demo.plan_stage(two, instance, demo.stage_of("latent_store")) == [("1", [dg.AssetKey("latent_store")])]
        reports = demo.materialize_graph(two, instance, stages=per_class, log=lambda m: None)

        new = {(r.asset_key.to_user_string(), r.partition_key)
               for asset in ("backbone", "latent_store", "mode_centroids", "distilled_images")
               for r in instance.fetch_materializations(
                   dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), after_storage_id=mark), limit=100).records}
        assert new == {("latent_store", "1"), ("mode_centroids", "1"),
                       ("distilled_images", "1|mgd3"), ("distilled_images", "1|random_real")}
        assert [r.runs for r in reports if r.in_graph] == [1, 1, 1, 1, 1, 2]  # inputs, backbone re-observed, not re-run
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
