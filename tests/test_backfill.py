"""Batched runs through Dagster's real launch path, as a user materializes from the UI: the
webserver receives the "Materialize all" request (GraphQL ``launchPartitionBackfill``, every
partition of the selected assets), and a running ``dagster-daemon``'s backfill daemon groups the
partitions by the assets' ``BackfillPolicy`` and launches each run as a process of its own.

Checked: the number of runs (one per stage chunk, not per partition), one backbone load per run
at most, one data version and one check result per partition, images equal to per-class runs',
no needless re-run at the next automation tick after observing the inputs, and a run of several
classes where one fails.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from unittest import mock

import dagster as dg
import numpy as np
import pytest
import yaml
from PIL import Image

from mgd3_assets import demo
from mgd3_assets.local_cluster import free_port, start_process, stop_process
from mgd3_assets.run_launcher import PID_TAG
from mgd3_core import storage
from mgd3_core.config import PROJECT_ROOT, config_from_dict
from tests.dagster_helpers import (DATA_VERSION_TAG, build_defs, evaluate, latest_materialization, requested,
                                   tiny_config, write_config)

pytestmark = pytest.mark.slow

PER_CLASS = ["latent_store", "mode_centroids", "distilled_images"]
BACKFILL_TAG = "dagster/backfill"


def _instance_dir(root: Path) -> Path:
    d = root / "dagster_home"
    d.mkdir(parents=True)
    (d / "dagster.yaml").write_text(yaml.safe_dump({
        # The project's storage class ($MGD3_HOME/dagster), as in the repository's dagster.yaml: the
        # daemon applies the launcher's settings and starts its fork server when it loads it.
        "storage": {"custom": {"module": "mgd3_assets.instance", "class": "Mgd3SqliteStorage", "config": {}}},
        # The core's log lines (a backbone load among them) become events of the run.
        "python_logs": {"managed_python_loggers": ["mgd3"], "python_log_level": "INFO"},
        # as in the repository's dagster.yaml: runs forked from a warm process, the backfill daemon quickened
        "run_launcher": {"module": "mgd3_assets.run_launcher", "class": "WarmRunLauncher",
                         "config": {"daemon_interval_seconds": 2}},
        "telemetry": {"enabled": False},
        "nux": {"enabled": False},
    }))
    return d


MATERIALIZE_ALL = """
mutation($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""


def _graphql(port: int, query: str, variables: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql",
                                     data=json.dumps({"query": query, "variables": variables}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _wait_for_webserver(port: int, proc, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the webserver did not answer in {timeout} s: {log.read_text()[-3000:]}")


def _pngs(cfg, home: Path, method: str, class_id: str) -> dict[str, np.ndarray]:
    out = {}
    for ipc in cfg.ipc:
        for seed in cfg.evaluation.generation_seeds:
            d = storage.set_images_dir(storage.distilled_set_dir(cfg, home, method, ipc, seed), class_id)
            out.update({f"ipc{ipc}/seed{seed}/{p.name}": np.asarray(Image.open(p)) for p in sorted(d.glob("*.png"))})
    return out


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory):
    """The tiny experiment's inputs and backbone made by the demo path, then every per-class
    partition materialized by a backfill that a real ``dagster-daemon`` executes."""
    root = tmp_path_factory.mktemp("backfill")
    raw = tiny_config()
    config = write_config(root / "tiny.yaml", raw)
    home, dagster_home = root / "home", _instance_dir(root)
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "MGD3_HOME": str(home), "MGD3_CONFIG": str(config)}
    defs = build_defs(config, home)
    with mock.patch.dict(os.environ, {"MGD3_HOME": str(home)}):  # where Mgd3SqliteStorage keeps the instance
        instance = dg.DagsterInstance.from_config(str(dagster_home))
    quiet = dict(log=lambda m: None, log_level="WARNING")
    demo.materialize_graph(defs, instance, stages=demo.STAGES[:3], **quiet)  # inputs observed, backbone
    # The inputs' observations are wiped: as after a UI "Materialize all" that never observed them.
    for source in ("dataset", "method_settings"):
        instance.wipe_assets([dg.AssetKey(source)])
    before = evaluate(defs, instance)  # the automation sensor has been ticking before the backfill
    runs_before_the_daemon = instance.get_runs_count()

    bin_dir, workspace, port = Path(sys.executable).parent, str(PROJECT_ROOT / "workspace.yaml"), free_port()
    webserver = start_process("dagster-webserver", [str(bin_dir / "dagster-webserver"), "-w", workspace,
                                                    "-h", "127.0.0.1", "-p", str(port)], root, env=env)
    daemon = start_process("dagster-daemon", [str(bin_dir / "dagster-daemon"), "run", "-w", workspace], root, env=env)
    try:
        fork_server = _wait_for_fork_server(daemon.pid)
        launched_before_the_fork_server = instance.get_runs_count() - runs_before_the_daemon
        _wait_for_webserver(port, webserver, root / "dagster-webserver.log")
        answer = _graphql(port, MATERIALIZE_ALL, {"backfillParams": {
            "assetSelection": [{"path": [a]} for a in PER_CLASS + ["teacher"]], "allPartitions": True}})
        result = answer["data"]["launchPartitionBackfill"]
        assert result["__typename"] == "LaunchBackfillSuccess", answer
        backfill_id = result["backfillId"]
        deadline = time.monotonic() + 600
        while instance.get_backfill(backfill_id).status.value == "REQUESTED":
            assert daemon.poll() is None, (root / "dagster-daemon.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "backfill not done after 600 s"
            time.sleep(2)
    finally:
        stop_process(daemon)
        stop_process(webserver)
    runs = instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_TAG: backfill_id}))
    return dict(root=root, raw=raw, cfg=config_from_dict(raw), home=home, defs=defs, instance=instance,
                backfill=instance.get_backfill(backfill_id), runs=runs, cursor=before.cursor,
                fork_server=fork_server, launched_before_the_fork_server=launched_before_the_fork_server)


def _wait_for_fork_server(daemon_pid: int, timeout: float = 120) -> int:
    """The pid of the fork server the daemon starts as it starts (``run_launcher.prestart_in_daemon``)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(daemon_pid).children(recursive=True):
            try:
                if "mgd3_assets.fork_server" in child.cmdline():
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.5)
    raise AssertionError(f"the daemon (pid {daemon_pid}) started no fork server in {timeout} s")


def test_the_daemon_starts_its_fork_server_before_the_first_run(backfilled):
    """The first run launched after the daemon starts does not wait for the libraries' imports."""
    assert backfilled["fork_server"] > 0 and backfilled["launched_before_the_fork_server"] == 0
    forked_from = {r.tags[PID_TAG] for r in backfilled["runs"]}
    assert len(forked_from) == len(backfilled["runs"])  # every run in a process of its own


def test_a_backfill_runs_one_run_per_stage_chunk_and_loads_the_backbone_once_per_run(backfilled):
    instance, cfg = backfilled["instance"], backfilled["cfg"]
    assert backfilled["backfill"].status.value == "COMPLETED_SUCCESS"
    runs = backfilled["runs"]
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    # each run's process was forked from the launcher's warm server, not started by the code server
    assert all(r.tags.get(PID_TAG, "").isdigit() for r in runs), [r.tags for r in runs]
    assert cfg.classes_per_run() >= len(cfg.dataset.classes)  # "auto": every tiny class in one run
    # latent_store: one run of both classes; mode_centroids: one; distilled_images: one per method.
    by_asset = sorted(tuple(sorted(k.to_user_string() for k in r.asset_selection)) for r in runs)
    assert by_asset == sorted([("latent_store",), ("mode_centroids",), ("teacher",)]
                              + [("distilled_images",)] * len(cfg.methods))
    for run in (r for r in runs if r.tags.get("dagster/asset_partition_range_start")):
        ranged = run.tags.get("dagster/asset_partition_range_start") != run.tags.get("dagster/asset_partition_range_end")
        assert ranged, run.tags  # each run holds both classes
        loads = [e for e in instance.all_logs(run.run_id)
                 if e.user_message and "loaded the embedded backbone" in e.user_message]
        needs = {"latent_store"} | ({"distilled_images"} if run.tags.get("dagster/partition/method", "") != "random_real"
                                    and "random_real" not in run.tags.get("dagster/asset_partition_range_start", "")
                                    else set())
        expected = 1 if {k.to_user_string() for k in run.asset_selection} & needs else 0
        assert len(loads) == expected, (run.asset_selection, run.tags, [e.user_message for e in loads])


def test_each_partition_has_its_own_data_version_and_check_result_from_its_run(backfilled):
    instance, cfg, home = backfilled["instance"], backfilled["cfg"], backfilled["home"]
    from mgd3_core.latents import validate_latent_store

    versions = {}
    for class_id in cfg.dataset.classes:
        mat = latest_materialization(instance, "latent_store", class_id)
        info = validate_latent_store(Path(mat.metadata["path"].value))
        versions[class_id] = mat.tags[DATA_VERSION_TAG]
        assert versions[class_id] == info.content_hash  # the class's own store, not the run's
    assert len(set(versions.values())) == len(versions)
    for check, asset in (("latent_store_complete", "latent_store"), ("centroids_valid", "mode_centroids"),
                         ("distilled_complete", "distilled_images")):
        records = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey(asset), check), limit=100)
        node = backfilled["defs"].resolve_asset_graph().get(dg.AssetKey(asset))
        assert {r.partition for r in records} == set(node.partitions_def.get_partition_keys())
        assert all(r.evaluation and r.evaluation.passed for r in records)
        assert {r.run_id for r in records} <= {r.run_id for r in backfilled["runs"]}  # no check-only runs


def test_a_modes_run_records_its_classes_together_after_the_last_one_is_done(backfilled):
    """So the backfill daemon finds all of them ready at one tick and groups the distilled images
    by method, as make demo does (Dagster groups by the dimension with fewer ready keys)."""
    instance = backfilled["instance"]
    (run,) = [r for r in backfilled["runs"] if {k.to_user_string() for k in r.asset_selection} == {"mode_centroids"}]
    logs = instance.all_logs(run.run_id)
    done = [e.timestamp for e in logs if e.user_message and e.user_message.startswith("modes of class")]
    recorded = [e.timestamp for e in logs if e.dagster_event and e.dagster_event.is_step_materialization]
    assert len(done) == len(recorded) == len(backfilled["cfg"].dataset.classes) > 1
    assert min(recorded) >= max(done)


def test_images_do_not_depend_on_how_classes_are_grouped_into_runs(backfilled, tmp_path):
    """The same config with one class per run (``runs.classes_per_run: 1``) makes the same PNGs.
    Tolerance: a class's images are sampled in a batch of 2 classes here and of 1 there, and other
    batch shapes may take other vectorised CPU paths (float32 rounding in the last bits,
    ``sampling.sample``); a pixel may then round to the next grey level. Same noise, modes and seeds."""
    raw = {**backfilled["raw"], "runs": {"classes_per_run": 1}}
    home2 = tmp_path / "home"
    shutil.copytree(storage.backbones_dir(backfilled["home"]), storage.backbones_dir(home2))  # the same backbone
    defs2 = build_defs(write_config(tmp_path / "alone.yaml", raw), home2)
    upto = demo.STAGES.index(demo.stage_of("teacher"))
    with dg.DagsterInstance.ephemeral() as instance:
        reports = demo.materialize_graph(defs2, instance, stages=demo.STAGES[:upto], log=lambda m: None,
                                         log_level="WARNING")
    distill = demo.STAGES.index(demo.stage_of("distilled_images"))
    assert reports[distill].runs == len(raw["methods"]) * len(raw["dataset"]["classes"])  # one per (method, class)
    cfg = backfilled["cfg"]
    for method in cfg.methods:
        for class_id in cfg.dataset.classes:
            grouped, single = _pngs(cfg, backfilled["home"], method, class_id), _pngs(cfg, home2, method, class_id)
            assert grouped.keys() == single.keys() and grouped
            for name in grouped:
                diff = np.abs(grouped[name].astype(int) - single[name].astype(int))
                assert diff.max() <= 1 and (diff == 0).mean() >= 0.99, (method, class_id, name, diff.max())


def test_after_the_backfill_observing_the_inputs_makes_nothing_stale(backfilled):
    """The inputs were never observed before the backfill (as after a UI "Materialize all"); the
    runs recorded what they read, so the first observation finds everything up to date, and the
    automation, ticking all along, requests none of them again. (Without the runs' own
    observations, the tick after the hourly observation re-requests every latent store, mode,
    distilled set and the teacher: checked by removing them.)"""
    instance, defs = backfilled["instance"], backfilled["defs"]
    # The automation's tick after the backfill, then the hourly observation and the next tick.
    after = evaluate(defs, instance, backfilled["cursor"])
    first = requested(after)
    demo.materialize_graph(defs, instance, stages=demo.INPUT_STAGES, log=lambda m: None, log_level="WARNING")
    for stage in demo.STAGES[len(demo.INPUT_STAGES) + 1:demo.STAGES.index(demo.stage_of("teacher"))]:
        assert demo.plan_stage(defs, instance, stage) == [], stage
    # The teacher is fresh too.
    assert not any(dg.AssetKey("teacher") in keys for _, keys in demo.plan_stage(defs, instance, demo.stage_of("teacher")))
    asked = requested(evaluate(defs, instance, after.cursor))
    for ticked in (first, asked):
        assert not {a: p for a, p in ticked.items() if a in PER_CLASS + ["teacher"]}, (first, asked)


def test_a_failing_class_in_a_run_of_several_is_named_and_the_others_are_kept(backfilled, tmp_path):
    """Class "1"'s modes are gone: the distill run of both classes fails naming class 1, class 0's
    images are materialized, and the next plan runs class 1 only."""
    home, cfg = backfilled["home"], backfilled["cfg"]
    instance = backfilled["instance"]
    defs = backfilled["defs"]
    modes = storage.modes_file(cfg, home, "1")
    saved = modes.read_bytes()
    modes.unlink()
    mark = instance.event_log_storage.get_maximum_record_id()
    try:
        with pytest.raises(demo.DemoError) as failed:
            demo.run_stage(defs, instance, demo.stage_of("distilled_images"), force=True,
                           log=lambda m: None, log_level="CRITICAL")
    finally:
        modes.write_bytes(saved)
    message = str(failed.value)
    assert "1|mgd3" in message or "1|random_real" in message, message
    assert "no modes for class '1'" in message.splitlines()[-1]
    new = {(r.partition_key) for r in instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("distilled_images"), after_storage_id=mark), limit=100).records}
    assert new and all(pk.startswith("0|") for pk in new), new  # class 0 written and kept
