"""Declarative automation, evaluated with ``evaluate_automation_conditions`` on recorded events.

The conditions read only the event log (data versions of materializations and
observations), so each case records the events a real run would write, then
evaluates one tick. No model is trained here.
"""

import dagster as dg
import pytest

from tests.dagster_helpers import (
    GATHERING,
    all_partitions,
    build_defs,
    evaluate,
    report_event,
    run_ticks,
    seed_graph,
    tiny_config,
    write_config,
)

PRETRAINED = {"kind": "pretrained", "transformer_dir": "/models/dit", "vae_dir": "/models/vae"}
THREE_CLASSES = {"classes": ["0", "1", "2"]}
ALL_SIX = ["mgd3", "unguided", "mgd3_no_stop", "random_real", "closest_real", "decoded_centroids"]


def _defs(tmp_path, name="cfg.yaml", **changes):
    return build_defs(write_config(tmp_path / name, tiny_config(**changes)), tmp_path / "home")


_evaluate = evaluate


# The teacher and the full-data students are trained on real images only: no backbone upstream.
BELOW_BACKBONE = ("latent_store", "mode_centroids", "distilled_images", "students", "diversity_report",
                  "evaluation_report")


def _downstream_of_backbone(defs) -> dict[str, set]:
    return {asset: set(pks) for asset, pks in all_partitions(defs).items() if asset in BELOW_BACKBONE}


def _merged(ticks: list[dict]) -> dict[str, set]:
    """Union of the requests of all ticks, checking that no partition was requested twice."""
    out: dict[str, set] = {}
    for tick in ticks:
        for asset, pks in tick.items():
            assert not (out.get(asset, set()) & pks), f"{asset} {pks} requested again in {ticks}"
            out.setdefault(asset, set()).update(pks)
    return out


def _tick_of(ticks: list[dict], asset: str) -> int:
    (index,) = [i for i, t in enumerate(ticks) if asset in t]
    return index


def _assert_gathering_runs_once_after_all_classes(ticks: list[dict]) -> None:
    """Reports are requested once, on a tick after every per-class partition was updated."""
    last_per_class = max(i for i, t in enumerate(ticks) for a in t if a not in GATHERING)
    assert _tick_of(ticks, "diversity_report") > last_per_class
    assert _tick_of(ticks, "evaluation_report") > max(_tick_of(ticks, "students"), last_per_class)


@pytest.mark.parametrize("backbone", ["embedded", "pretrained"])
def test_backbone_fingerprint_change_requests_every_dependent_partition(tmp_path, backbone):
    observed = backbone == "pretrained"
    changes = {"dataset": THREE_CLASSES, "methods": ALL_SIX}
    if observed:
        changes["backbone"] = PRETRAINED
    defs = _defs(tmp_path, **changes)
    with dg.DagsterInstance.ephemeral() as instance:
        seed_graph(instance, defs, "fp1", observe_backbone=observed)
        first = _evaluate(defs, instance)
        assert first.total_requested == 0  # a fully materialized graph: nothing to do

        report_event(instance, "backbone", None, "fp1", observation=observed)  # same fingerprint again
        ticks, cursor = run_ticks(defs, instance, first.cursor)
        assert ticks == []

        report_event(instance, "backbone", None, "fp2", observation=observed)  # a new fingerprint
        ticks, cursor = run_ticks(defs, instance, cursor)
        expected = _downstream_of_backbone(defs)
        assert len(expected["distilled_images"]) == 3 * 6
        # The first tick requests every per-class partition at once (one backfill) ...
        assert ticks[0] == {a: expected[a] for a in ("latent_store", "mode_centroids", "distilled_images")}
        # ... and over the following ticks every dependent partition is requested exactly once.
        assert _merged(ticks) == expected
        _assert_gathering_runs_once_after_all_classes(ticks)


def test_changed_class_reruns_only_that_class_and_the_gathering_assets(tmp_path):
    defs = _defs(tmp_path, dataset=THREE_CLASSES)
    with dg.DagsterInstance.ephemeral() as instance:
        seed_graph(instance, defs)
        cursor = _evaluate(defs, instance).cursor

        report_event(instance, "latent_store", "1", "latent_store-1-a")  # same content again
        ticks, cursor = run_ticks(defs, instance, cursor)
        assert ticks == []

        report_event(instance, "latent_store", "1", "latent_store-1-new")  # the class's images changed
        ticks, cursor = run_ticks(defs, instance, cursor)
        methods = tiny_config()["methods"]
        assert _merged(ticks) == {
            "mode_centroids": {"1"},
            "distilled_images": {f"1|{m}" for m in methods},
            "students": set(methods),
            "evaluation_report": {None},
            "diversity_report": {None},
        }
        _assert_gathering_runs_once_after_all_classes(ticks)


def test_added_class_runs_only_its_partitions_and_the_gathering_assets(tmp_path):
    """With a backbone that already knows the class (a pretrained one), nothing else re-runs."""
    defs = _defs(tmp_path, "two.yaml", backbone=PRETRAINED)
    with dg.DagsterInstance.ephemeral() as instance:
        seed_graph(instance, defs, observe_backbone=True)
        cursor = _evaluate(defs, instance).cursor

        grown = _defs(tmp_path, "three.yaml", backbone=PRETRAINED, dataset=THREE_CLASSES)
        ticks, cursor = run_ticks(grown, instance, cursor)
        methods = tiny_config()["methods"]
        assert _merged(ticks) == {
            "latent_store": {"2"},
            "mode_centroids": {"2"},
            "distilled_images": {f"2|{m}" for m in methods},
            # everything trained or measured on all classes
            "teacher": {None},
            "full_data_students": {None},
            "students": set(methods),
            "evaluation_report": {None},
            "diversity_report": {None},
        }
        _assert_gathering_runs_once_after_all_classes(ticks)


def test_added_class_retrains_an_embedded_backbone(tmp_path):
    """The embedded backbone is trained on the configured classes: a new class is a new backbone."""
    a = _defs(tmp_path, "two.yaml")
    b = _defs(tmp_path, "three.yaml", dataset=THREE_CLASSES)
    code_version = lambda d: d.resolve_asset_graph().get(dg.AssetKey("backbone")).code_version  # noqa: E731
    assert code_version(a) != code_version(b)


def test_changed_backbone_settings_retrain_the_embedded_backbone_then_rerun_everything(tmp_path):
    defs = _defs(tmp_path, "a.yaml")
    with dg.DagsterInstance.ephemeral() as instance:
        seed_graph(instance, defs)
        cursor = _evaluate(defs, instance).cursor

        embedded = tiny_config()["backbone"]["embedded"]
        retrain = _defs(tmp_path, "b.yaml", backbone={"embedded": {**embedded, "seed": 1}})
        ticks, cursor = run_ticks(retrain, instance, cursor)
        assert ticks[0]["backbone"] == {None}
        assert _merged(ticks) == {"backbone": {None}, **_downstream_of_backbone(retrain)}
        assert "teacher" not in _merged(ticks)


def test_a_sampler_change_versions_no_asset_only_the_diffusion_methods_settings(tmp_path):
    """The sampler is not shared by every method: it changes no code version (which would make
    every distilled partition stale), only the diffusion methods' ``method_settings``."""
    from mgd3_assets.versions import method_settings_version
    from mgd3_core.config import config_from_dict

    sampler = {"steps": 5, "t_stop": 2, "batch_size": 16}
    a, b = _defs(tmp_path, "a.yaml"), _defs(tmp_path, "b.yaml", sampler=sampler)
    graph_a, graph_b = a.resolve_asset_graph(), b.resolve_asset_graph()
    changed = {k.to_user_string() for k in graph_a.materializable_asset_keys
               if graph_a.get(k).code_version != graph_b.get(k).code_version}
    assert changed == set()
    cfg_a, cfg_b = config_from_dict(tiny_config(methods=ALL_SIX)), config_from_dict(tiny_config(
        methods=ALL_SIX, sampler=sampler))
    assert {m for m in ALL_SIX if method_settings_version(cfg_a, m) != method_settings_version(cfg_b, m)} == {
        "mgd3", "unguided", "mgd3_no_stop"}


def test_changed_method_settings_rerun_only_that_methods_partitions(tmp_path):
    defs = _defs(tmp_path, methods=ALL_SIX)
    with dg.DagsterInstance.ephemeral() as instance:
        seed_graph(instance, defs)
        cursor = _evaluate(defs, instance).cursor
        report_event(instance, "method_settings", "mgd3", "new-sampler", observation=True)
        ticks, cursor = run_ticks(defs, instance, cursor)
        assert _merged(ticks) == {
            "distilled_images": {"0|mgd3", "1|mgd3"},
            "students": {"mgd3"},
            "evaluation_report": {None},
            "diversity_report": {None},
        }


def test_demo_runs_trigger_nothing_other_runs_do():
    """The condition on a toy graph with real runs: a changed parent re-runs its child, unless
    the change came from a run of `make demo` (which runs the child itself)."""
    from mgd3_assets.automation import DEMO_RUN_TAG, on_upstream_data_change

    version = {"value": "v1"}

    @dg.asset
    def parent() -> dg.MaterializeResult:
        return dg.MaterializeResult(data_version=dg.DataVersion(version["value"]))

    @dg.asset(deps=[parent], automation_condition=on_upstream_data_change())
    def child() -> None: ...

    with dg.DagsterInstance.ephemeral() as instance:
        dg.materialize([parent, child], instance=instance)
        cursor = _evaluate([parent, child], instance).cursor

        version["value"] = "v2"
        dg.materialize([parent], instance=instance, tags={DEMO_RUN_TAG: "demo"})
        result = _evaluate([parent, child], instance, cursor)
        assert result.total_requested == 0

        dg.materialize([parent], instance=instance)  # same data again, from the UI
        result = _evaluate([parent, child], instance, result.cursor)
        assert result.total_requested == 0

        version["value"] = "v3"
        dg.materialize([parent], instance=instance)  # new data, from the UI or the sensor
        result = _evaluate([parent, child], instance, result.cursor)
        assert result.get_requested_partitions(dg.AssetKey("child")) == {None}


def test_changed_class_images_rerun_that_class_and_what_reads_every_image(tmp_path):
    defs = _defs(tmp_path, dataset=THREE_CLASSES)
    with dg.DagsterInstance.ephemeral() as instance:
        seed_graph(instance, defs)
        cursor = _evaluate(defs, instance).cursor
        report_event(instance, "dataset", "1", "dataset-1-a", observation=True)  # re-observed, same files
        ticks, cursor = run_ticks(defs, instance, cursor)
        assert ticks == []
        report_event(instance, "dataset", "1", "dataset-1-edited", observation=True)  # an image of class 1 changed
        ticks, cursor = run_ticks(defs, instance, cursor)  # (each request records a new data version)
        methods = tiny_config()["methods"]
        union = {}
        for tick in ticks:
            for asset, pks in tick.items():
                union.setdefault(asset, set()).update(pks)
        assert union == {
            "latent_store": {"1"},
            "mode_centroids": {"1"},
            "distilled_images": {f"1|{m}" for m in methods},
            # the teacher is trained on every class's training images (through their stores)
            "teacher": {None},
            "full_data_students": {None},
            "students": set(methods),
            "evaluation_report": {None},
            "diversity_report": {None},
        }
        # Nothing is left stale: the reports run (again) after the class's new students.
        last = lambda asset: max(i for i, t in enumerate(ticks) if asset in t)  # noqa: E731
        assert last("diversity_report") > last("distilled_images") and last("evaluation_report") > last("students")


def test_the_hourly_observation_of_an_input_is_one_run_of_all_its_partitions(tmp_path):
    """Each partitioned input is observed by a schedule: one run an hour observes every class (or
    method), instead of one run per partition; the automation sensor requests no observation."""
    defs = _defs(tmp_path, dataset=THREE_CLASSES)
    for asset in ("dataset", "method_settings"):
        schedule = defs.resolve_schedule_def(f"observe_{asset}_hourly")
        assert schedule.cron_schedule == "0 * * * *"
        with dg.DagsterInstance.ephemeral() as instance:
            requests = schedule.evaluate_tick(dg.build_schedule_context(instance=instance)).run_requests
            assert len(requests) == 1 and requests[0].partition_key is None
            job = defs.resolve_job_def(schedule.job_name)
            assert job.execute_in_process(instance=instance, tags=requests[0].tags).success
            observed = {r.partition_key for r in instance.fetch_observations(dg.AssetKey(asset), limit=100).records}
            assert observed == set(all_partitions_of(defs, asset)) and len(observed) >= 2
            assert len(instance.get_runs()) == 1
    with dg.DagsterInstance.ephemeral() as instance:
        asked = _evaluate(defs, instance)
        assert not {r.key for r in asked.results if isinstance(r.key, dg.AssetKey)
                    and r.key.to_user_string() in ("dataset", "method_settings") and r.true_subset.size}


def all_partitions_of(defs, asset: str) -> list[str]:
    return defs.resolve_asset_graph().get(dg.AssetKey(asset)).partitions_def.get_partition_keys()
