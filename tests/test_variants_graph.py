"""Method variants as partitions: a grid of settings in one graph, incremental per variant.

One tiny graph (``tiny_config``: two classes, 4 sampling steps, IPC 2) with ``mgd3``, ``random_real``,
a named lambda variant and a 2 lambda x 2 t_stop grid, materialized once for the module; each test
then changes the config on a copy of its instance and counts what ``make demo`` runs.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

from mgd3_assets import demo
from mgd3_assets.versions import code_version, method_settings_version, stage_inputs
from mgd3_core import pipeline, storage
from mgd3_core.config import ALL_METHODS, config_from_dict, load_config
from mgd3_core.distilled import MANIFEST_COLUMNS, VARIANT_COLUMNS
from tests.dagster_helpers import (TINY_GRAPH_CHANGES, TinyGraph, build_defs, latest_materialization,
                                   tiny_config, write_config)

# lambda 0.1 / t_stop 2 are the tiny config's own sampler settings: that grid point is mgd3 itself.
GRID = {"grid": {"kind": "mgd3", "guidance_strength": [0.3, 0.1], "t_stop": [0, 2]}}
GRID_NAMES = ["mgd3~guidance_strength=0.3~t_stop=0", "mgd3~guidance_strength=0.3~t_stop=2",
              "mgd3~guidance_strength=0.1~t_stop=0", "mgd3~guidance_strength=0.1~t_stop=2"]
LAMBDA_VARIANT = {"name": "mgd3-l005", "kind": "mgd3", "guidance_strength": 0.05}
METHODS = ["mgd3", "random_real", LAMBDA_VARIANT, GRID]
QUIET = {"log": lambda m: None, "log_level": "WARNING"}


@pytest.fixture(scope="module")
def grid_graph(tmp_path_factory):
    return TinyGraph(tmp_path_factory.mktemp("grid_graph"), tiny_config(methods=METHODS)).materialize()


def _copy(graph: TinyGraph, tmp_path: Path) -> dg.DagsterInstance:
    """A private copy of the graph's instance and storage root (runs, data versions, files)."""
    shutil.copytree(graph.root / "dagster_storage", tmp_path / "dagster_storage")
    shutil.copytree(graph.home, tmp_path / "home")
    (tmp_path / "dagster_home").mkdir()
    (tmp_path / "dagster_home" / "dagster.yaml").write_text(yaml.safe_dump({
        "storage": {"sqlite": {"base_dir": str(tmp_path / "dagster_storage")}}, "telemetry": {"enabled": False},
        "concurrency": {"pools": {"default_limit": 1}}}))
    return dg.DagsterInstance.from_config(str(tmp_path / "dagster_home"))


def _defs(tmp_path: Path, name: str, methods: list) -> dg.Definitions:
    return build_defs(write_config(tmp_path / f"{name}.yaml", tiny_config(methods=methods)), tmp_path / "home")


def _runs(reports) -> dict[str, list]:
    """{job: the partitions (keys or ranges) of its runs} of the stages that ran something."""
    return {r.job: [demo.describe(p) for p in r.partitions] for r in reports if r.runs}


def _manifest(cfg, home, method: str, class_id: str = "0") -> list[dict]:
    with open(storage.set_manifest_file(storage.distilled_set_dir(cfg, home, method, 2, 0), class_id)) as f:
        return list(csv.DictReader(f))


def test_the_six_names_keep_their_versions_from_before_variants():
    """The versions a materialized storage root was recorded with (computed by the code before
    variants existed): the same, so no partition of an existing root becomes stale or renamed."""
    default = load_config("configs/embedded.yaml")
    assert default.methods == list(ALL_METHODS)
    assert {m: method_settings_version(default, m) for m in ALL_METHODS} == {
        "mgd3": "b94920aca7a27662", "unguided": "065c57111fd6c5fc", "mgd3_no_stop": "ac77a505d2c5ca7b",
        "random_real": "8771c72fa3155dd4", "closest_real": "64ff4440af69478e", "decoded_centroids": "d86ae0fd628c28c3"}
    tiny = config_from_dict(tiny_config(**TINY_GRAPH_CHANGES))
    assert [method_settings_version(tiny, m) for m in ("mgd3", "unguided", "mgd3_no_stop")] == [
        "cca9e6d2a5b4119b", "354fa22936392f13", "27ac45fbe4226d77"]
    assert (code_version(default, "mode_centroids"), code_version(default, "distilled_images")) == (
        "v1-0377ac6d0f26", "v1-2f968a6778c2")
    # The reports' versions name the methods only when they are not the six base names.
    assert "methods" not in stage_inputs(default, "evaluation_report")
    assert stage_inputs(config_from_dict({"methods": METHODS}), "evaluation_report")["methods"][2] == "mgd3-l005"
    overrides = config_from_dict({"method_overrides": {"mgd3": {"cfg_scale": 2.0, "guidance_schedule": "cosine"},
                                                       "unguided": {"t_stop": 10}}})
    assert [method_settings_version(overrides, m) for m in ("mgd3", "unguided")] == [
        "a93c18ff7db36d68", "7785f1a5d3a3a932"]


def test_a_grid_materializes_one_partition_per_variant(grid_graph):
    cfg, home, instance = grid_graph.cfg, grid_graph.home, grid_graph.instance
    names = ["mgd3", "random_real", "mgd3-l005", *GRID_NAMES]
    assert cfg.methods == names
    graph = grid_graph.defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey("students")).partitions_def.get_partition_keys() == names
    assert not graph.has(dg.AssetKey("variant_modes"))  # every method uses the config's finder
    # One distill run per method (both classes), one students run per method.
    runs = _runs(grid_graph.stage_reports)
    assert len(runs[demo.DISTILL_JOB]) == len(runs[demo.STUDENTS_JOB]) == len(names)
    for name in GRID_NAMES:
        row = _manifest(cfg, home, name)[0]
        lam, t_stop = cfg.sampler_for(name).guidance_strength, cfg.sampler_for(name).t_stop
        assert (float(row["lambda"]), int(row["t_stop"]), row["method"], row["method_kind"]) == (lam, t_stop, name, "mgd3")
        meta = latest_materialization(instance, "students", name).metadata
        assert meta["method_kind"].value == "mgd3" and meta["variant_settings"].value == {
            "guidance_strength": lam, "t_stop": t_stop}
    # A base method's manifest is as before; a variant's says what it is.
    assert list(_manifest(cfg, home, "mgd3")[0]) == MANIFEST_COLUMNS
    assert list(_manifest(cfg, home, "mgd3-l005")[0]) == MANIFEST_COLUMNS + VARIANT_COLUMNS
    # The grid point with mgd3's own settings gives mgd3's images, byte for byte; another lambda does not.
    same, other = (_manifest(cfg, home, n) for n in ("mgd3~guidance_strength=0.1~t_stop=2", "mgd3~guidance_strength=0.3~t_stop=2"))
    assert [r["sha256"] for r in same] == [r["sha256"] for r in _manifest(cfg, home, "mgd3")]
    assert [r["sha256"] for r in other] != [r["sha256"] for r in same]


def test_adding_and_removing_a_variant_runs_only_its_partitions(grid_graph, tmp_path):
    added = {"name": "mgd3-cfg2", "kind": "mgd3", "cfg_scale": 2.0}
    with _copy(grid_graph, tmp_path) as instance:
        before = {m: latest_materialization(instance, "distilled_images", f"0|{m}") for m in grid_graph.cfg.methods}
        reports = demo.materialize_graph(_defs(tmp_path, "added", [*METHODS, added]), instance, **QUIET)
        assert _runs(reports) == {
            demo.DATASET_JOB: [""], demo.METHOD_SETTINGS_JOB: [""],  # observed every time (cheap)
            demo.DISTILL_JOB: ["0|mgd3-cfg2...1|mgd3-cfg2"], demo.STUDENTS_JOB: ["mgd3-cfg2"],
            demo.REPORTS_JOB: [""]}
        # Removed again: the other variants' partitions are neither stale nor re-run; the reports,
        # which list every method, are.
        removed = _defs(tmp_path, "removed", METHODS)
        reports = demo.materialize_graph(removed, instance, **QUIET)
        assert set(_runs(reports)) == {demo.DATASET_JOB, demo.METHOD_SETTINGS_JOB, demo.REPORTS_JOB}
        after = {m: latest_materialization(instance, "distilled_images", f"0|{m}") for m in grid_graph.cfg.methods}
        assert {m: e.tags["dagster/data_version"] for m, e in after.items()} == \
            {m: e.tags["dagster/data_version"] for m, e in before.items()}


def test_editing_one_variants_lambda_makes_only_it_stale(grid_graph, tmp_path):
    edited = [*METHODS[:2], {**LAMBDA_VARIANT, "guidance_strength": 0.2}, GRID]
    with _copy(grid_graph, tmp_path) as instance:
        defs = _defs(tmp_path, "edited", edited)
        demo.run_stage(defs, instance, demo.stage_of("method_settings"), **QUIET)  # as make demo does first
        plan = demo.plan_stage(defs, instance, demo.stage_of("distilled_images"))
        assert [demo.describe(pk) for pk, _ in plan] == ["0|mgd3-l005...1|mgd3-l005"]
        assert demo.plan_stage(defs, instance, demo.stage_of("mode_centroids")) == []


def test_a_mode_finder_variant_computes_its_modes_once_per_class(grid_graph, tmp_path, monkeypatch):
    gmm = {"grid": {"kind": "mgd3", "name": "gmm", "modes": {"method": "gmm"}, "guidance_strength": [0.05, 0.3]}}
    calls = []
    real = pipeline.discover_modes
    monkeypatch.setattr(pipeline, "discover_modes", lambda cfg, home, class_id, fp, modes=None: calls.append(
        (class_id, modes and modes.method)) or real(cfg, home, class_id, fp, modes))
    with _copy(grid_graph, tmp_path) as instance:
        defs = _defs(tmp_path, "gmm", [*METHODS, gmm])
        upto = demo.STAGES.index(demo.stage_of("distilled_images")) + 1  # the modes and images suffice here
        reports = demo.materialize_graph(defs, instance, stages=demo.STAGES[:upto], **QUIET)
        runs = _runs(reports)
        assert sorted(calls) == [("0", "gmm"), ("1", "gmm")]  # two variants, one GMM fit per class
        assert runs[demo.VARIANT_MODES_JOB] == ["0|gmm~n_init=1...1|gmm~n_init=1"] and demo.MODES_JOB not in runs
        assert sorted(runs[demo.DISTILL_JOB]) == ["0|gmm~guidance_strength=0.05~modes.method=gmm...1|gmm~guidance_strength=0.05~modes.method=gmm",
                                                  "0|gmm~guidance_strength=0.3~modes.method=gmm...1|gmm~guidance_strength=0.3~modes.method=gmm"]
        cfg = config_from_dict(tiny_config(methods=[*METHODS, gmm]))
        name = "gmm~guidance_strength=0.05~modes.method=gmm"
        path = storage.modes_file(cfg, tmp_path / "home", "1", "gmm~n_init=1")
        assert pipeline.read_modes(cfg, tmp_path / "home", "1", 2, 0, cfg.modes_for(name)).centroids.shape[0] == 2
        assert path.is_file() and _manifest(cfg, tmp_path / "home", name, "1")[0]["mode_finder"] == "gmm~n_init=1"
        check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("variant_modes"), "centroids_valid")])
        assert check  # evaluated by the asset's own run
        # Lineage: the variant's distilled partition records the GMM modes it read.
        mat = latest_materialization(instance, "distilled_images", f"1|{name}")
        assert mat.tags.get("dagster/input_data_version/variant_modes") is not None
        assert latest_materialization(instance, "distilled_images", "1|mgd3").tags.get(
            "dagster/input_data_version/variant_modes") is None
