"""The code location loads, for the embedded default and for a user's config, and the
instance configuration (dagster.yaml, workspace.yaml) is what the demo and the UI use."""

from pathlib import Path

import dagster as dg
import yaml

from mgd3_core.config import ALL_METHODS, PROJECT_ROOT
from tests.dagster_helpers import all_partitions, build_defs, tiny_config, write_config

ASSETS = {"backbone", "latent_store", "mode_centroids", "distilled_images", "teacher", "full_data_students",
          "students", "diversity_report", "evaluation_report"}
OBSERVED = {"dataset", "method_settings"}  # observable sources: per-class files, per-method settings
# Every step that loads the backbone or trains a network holds the accelerator.
ACCELERATOR_ASSETS = {"backbone", "latent_store", "distilled_images", "teacher", "full_data_students", "students",
                      "diversity_report"}


def _asset_graph(defs):
    graph = defs.resolve_asset_graph()
    return graph, {k.to_user_string(): graph.get(k) for k in graph.get_all_asset_keys()}


def test_the_code_location_loads_the_embedded_default(monkeypatch, tmp_path):
    monkeypatch.delenv("MGD3_CONFIG", raising=False)
    monkeypatch.setenv("MGD3_HOME", str(tmp_path))
    from mgd3_assets.definitions import defs

    loaded = defs()  # what workspace.yaml's module loads
    dg.Definitions.validate_loadable(loaded)
    graph, nodes = _asset_graph(loaded)
    assert set(nodes) == ASSETS | OBSERVED
    assert {n for n, node in nodes.items() if not node.is_materializable} == OBSERVED
    parts = all_partitions(loaded)
    assert parts["latent_store"] == [str(d) for d in range(10)]
    assert len(parts["distilled_images"]) == 10 * len(ALL_METHODS)
    assert parts["students"] == list(ALL_METHODS)
    for name, node in nodes.items():
        assert node.code_version or name in OBSERVED, f"{name} has no code version"
        # The partitioned inputs are observed by a schedule, all partitions in one run.
        assert (node.automation_condition is not None) != (name in ("dataset", "method_settings")), name
    assert {n for n, node in nodes.items() if node.pools == {"accelerator"}} == ACCELERATOR_ASSETS
    assert {c.asset_key.to_user_string() for c in graph.asset_check_keys} == {
        "latent_store", "mode_centroids", "distilled_images"}
    assert all(graph.get_check_spec(c).blocking for c in graph.asset_check_keys)
    assert {j.name for j in loaded.resolve_all_job_defs()} >= {
        "backbone_job", "encode_job", "modes_job", "distill_job", "teacher_job", "students_job", "reports_job"}
    assert [s.name for s in loaded.sensors] == ["mgd3_automation"]
    assert sorted(s.name for s in loaded.schedules) == ["observe_dataset_hourly", "observe_method_settings_hourly"]
    # The storage root comes from the environment, and the UI shows that it does.
    home = loaded.resources["experiment"].home
    assert isinstance(home, dg.EnvVar) and home.get_value() == str(tmp_path)


def test_a_user_config_picks_the_partitions(monkeypatch, tmp_path):
    path = write_config(tmp_path / "mine.yaml", tiny_config(dataset={"classes": ["3", "7"]}))
    monkeypatch.setenv("MGD3_CONFIG", str(path))
    from mgd3_assets.definitions import defs

    parts = all_partitions(defs())
    assert parts["latent_store"] == ["3", "7"]
    assert sorted(parts["distilled_images"]) == ["3|mgd3", "3|random_real", "7|mgd3", "7|random_real"]


def test_a_pretrained_backbone_is_an_observable_source(tmp_path):
    pretrained = {"kind": "pretrained", "transformer_dir": "/models/DiT-XL-2-256", "vae_dir": "/models/sd-vae"}
    defs = build_defs(write_config(tmp_path / "p.yaml", tiny_config(backbone=pretrained)), tmp_path / "home")
    _, nodes = _asset_graph(defs)
    assert nodes["backbone"].is_observable and not nodes["backbone"].is_materializable
    assert nodes["latent_store"].parent_keys == {dg.AssetKey("backbone"), dg.AssetKey("dataset")}


def test_a_config_edited_after_loading_is_refused(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config())
    defs = build_defs(path, tmp_path / "home")
    write_config(path, tiny_config(sampler={"steps": 6, "t_stop": 3, "batch_size": 16}))
    result = defs.resolve_job_def("distill_job").execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), partition_key="0|mgd3", raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "changed since the definitions were loaded" in failure.event_specific_data.error.message


def test_the_instance_keeps_its_files_under_the_storage_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MGD3_HOME", str(tmp_path))
    with dg.DagsterInstance.from_config(str(PROJECT_ROOT)) as instance:
        assert Path(instance.storage_directory()).is_relative_to(tmp_path / "dagster")
        assert Path(instance.compute_log_manager._base_dir).is_relative_to(tmp_path / "dagster")
        assert instance.run_storage._conn_string.startswith(f"sqlite:///{tmp_path}/dagster")  # noqa: SLF001
        pools = instance.get_concurrency_config().pool_config
        assert pools.default_pool_limit == 1  # the accelerator pool: one step at a time
        assert instance.event_log_storage.supports_global_concurrency_limits
    settings = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    assert settings["telemetry"] == {"enabled": False}
    workspace = yaml.safe_load((PROJECT_ROOT / "workspace.yaml").read_text())
    assert workspace["load_from"][0]["python_module"]["module_name"] == "mgd3_assets.definitions"


def test_the_code_location_is_built_again_only_when_its_config_or_environment_changes(monkeypatch, tmp_path):
    # Dask workers load the code location for every step and demo runners for every run: the
    # same config and environment give the same definitions; any change gives new ones.
    from mgd3_assets.definitions import defs

    config = write_config(tmp_path / "tiny.yaml", tiny_config())
    monkeypatch.setenv("MGD3_CONFIG", str(config))
    monkeypatch.setenv("MGD3_HOME", str(tmp_path / "a"))
    first = defs()
    assert defs() is first
    monkeypatch.setenv("MGD3_HOME", str(tmp_path / "b"))
    second = defs()
    assert second is not first
    edited = tiny_config()
    edited["dataset"]["classes"] = ["0", "1", "2"]
    write_config(config, edited)
    third = defs()
    assert third is not second
    assert all_partitions(third)["latent_store"] == ["0", "1", "2"]
