"""The private Dagster APIs behind mgd3_assets/dagster_private.py still exist and behave.

These fail, by name, when a dagster upgrade moves or changes one of them: fix
dagster_private.py (the only module that imports ``dagster._...``), not the callers.
"""

from __future__ import annotations

import inspect
import pathlib

import dagster as dg

from mgd3_assets import dagster_private as private

REPO = pathlib.Path(__file__).resolve().parent.parent


def _params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def test_no_other_module_imports_private_dagster_apis():
    offenders = [str(p.relative_to(REPO)) for d in ("mgd3_core", "mgd3_assets", "bench", "experiments", "tests")
                 for p in (REPO / d).rglob("*.py")
                 if "dagster._" in p.read_text() and p.name not in ("dagster_private.py", "test_dagster_private.py")]
    assert offenders == []


def test_the_storage_classes_instance_py_subclasses_keep_their_constructors():
    # instance.py calls DagsterSqliteStorage.from_local(base_dir, inst_data=...) and
    # LocalComputeLogManager / LocalArtifactStorage(base_dir, inst_data=...).
    assert {"base_dir", "inst_data"} <= _params(private.DagsterSqliteStorage.from_local)
    assert {"base_dir", "inst_data"} <= _params(private.LocalComputeLogManager.__init__)
    assert {"base_dir", "inst_data"} <= _params(private.LocalArtifactStorage.__init__)
    for cls in (private.DagsterSqliteStorage, private.LocalComputeLogManager, private.LocalArtifactStorage):
        assert callable(getattr(cls, "from_config_value")) and callable(getattr(cls, "config_type")), cls
    assert private.ConfigurableClassData.__name__ == "ConfigurableClassData"


def test_the_stale_status_resolver_reports_missing_fresh_and_stale(tmp_path):
    @dg.asset
    def up() -> dg.MaterializeResult:
        return dg.MaterializeResult(data_version=dg.DataVersion(version["up"]))

    @dg.asset(deps=[up])
    def down() -> None:
        return None

    version = {"up": "a"}
    defs = dg.Definitions(assets=[up, down])
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        resolver = private.stale_status_resolver(defs, instance)
        assert not private.is_fresh(resolver, dg.AssetKey("up"), None)  # never materialized
        dg.materialize([up, down], instance=instance)
        resolver = private.stale_status_resolver(defs, instance)
        assert private.is_fresh(resolver, dg.AssetKey("up"), None)
        assert private.is_fresh(resolver, dg.AssetKey("down"), None)
        version["up"] = "b"  # new data upstream: down is stale, as the UI's "unsynced" badge shows
        dg.materialize([up], instance=instance)
        resolver = private.stale_status_resolver(defs, instance)
        assert private.is_fresh(resolver, dg.AssetKey("up"), None)
        assert not private.is_fresh(resolver, dg.AssetKey("down"), None)
