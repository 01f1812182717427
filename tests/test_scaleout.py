"""The graph on a PostgreSQL instance with its steps on a Dask cluster (tests/services.py),
compared with the in-process run of the same tiny experiment (``tiny_graph``).
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster_postgres import PostgresRunStorage

from mgd3_assets import demo
from mgd3_assets.cluster_demo import output_files as _outputs
from mgd3_assets.executors import DASK_RESOURCES_TAG, ExecutorConfigError, build_executor
from mgd3_assets.local_cluster import free_port
from mgd3_assets.run_pool import PARALLEL_ENV, parallel_runs
from mgd3_core import pipeline
from mgd3_core.config import PROJECT_ROOT
from mgd3_core.distilled import lineage_of
from tests.dagster_helpers import tiny_config, write_config
from tests.services import DEPLOY, scaleout  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow


def _step_pids(instance, run_ids) -> list[tuple[str, int]]:
    """(step key, pid of the process that started it) for every STEP_START of the runs."""
    out = []
    for run_id in run_ids:
        for record in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_START).records:
            event = record.event_log_entry.dagster_event
            out.append((event.step_key, event.pid))
    return out


def _distill_partition(scaleout, key: str):
    job = scaleout.defs.resolve_job_def(demo.DISTILL_JOB)
    return job, next(pk for pk in job.partitions_def.get_partition_keys() if pk == key)


@pytest.fixture(scope="module")
def dask_graph(tiny_graph, scaleout):  # the in-process reference first, before MGD3_EXECUTOR=dask
    """The tiny graph materialized through the Dask executor on PostgreSQL (once per module)."""
    t0 = time.time()
    reports = demo.materialize_graph(scaleout.defs, scaleout.instance, log=lambda m: None, log_level="WARNING")
    print("dask stages:", ", ".join(f"{r.job} {r.runs} run(s) {r.seconds:.1f} s" for r in reports))
    return reports, t0


def test_the_graph_on_postgres_and_dask_writes_what_the_in_process_run_writes(tiny_graph, scaleout, dask_graph):
    reports, _ = dask_graph
    # every stage ran, as in process: the two input observations, then the graph, both classes in
    # each run: backbone, latent stores, modes, one distill run per method, teacher, students, reports
    assert [r.runs for r in reports if r.in_graph] == [1, 1, 1, 1, 1, 2, 1, 2, 1]
    assert isinstance(scaleout.instance.run_storage, PostgresRunStorage)
    # Same experiment, same seeds, same torch thread count: the same bytes (PNGs, latent stores,
    # modes, manifests, checkpoints), computed in other processes.
    # The reference graph has every method; this one the tiny config's two (mgd3, random_real).
    for under in ("backbones", "latents", f"runs/{scaleout.cfg.name}/modes", f"runs/{scaleout.cfg.name}/distilled"):
        mine, reference = _outputs(scaleout.home, under), _outputs(tiny_graph.home, under)
        assert mine and (mine.keys() <= reference.keys() if under.endswith("distilled")
                         else mine.keys() == reference.keys()), under
        assert [k for k in mine if mine[k] != reference[k]] == [], under
    distilled = _outputs(scaleout.home, f"runs/{scaleout.cfg.name}/distilled")
    assert {k.split("/")[3] for k in distilled} == {"mgd3", "random_real"}
    assert pipeline.backbone_fingerprint(scaleout.cfg, scaleout.home) == \
        pipeline.backbone_fingerprint(tiny_graph.cfg, tiny_graph.home)


def test_accelerator_steps_run_only_on_the_worker_that_advertises_it(scaleout, dask_graph):
    _, t0 = dask_graph
    runs = [r.run_id for r in scaleout.instance.get_runs() if r.job_name != "__ASSET_JOB"]
    pids = scaleout.cluster.worker_pids()
    graph = scaleout.defs.resolve_asset_graph()
    accelerator = {k.to_python_identifier() for k in graph.materializable_asset_keys
                   if DASK_RESOURCES_TAG in scaleout.defs.resolve_assets_def(k).op.tags}
    assert accelerator == {"backbone", "latent_store", "distilled_images", "teacher", "full_data_students", "diversity_report",
                           "students"}
    steps = _step_pids(scaleout.instance, runs)
    assert {s for s, _ in steps} >= accelerator | {"mode_centroids", "diversity_report", "evaluation_report"}
    # Every step ran in a worker process, none in this (the orchestrating) process.
    assert os.getpid() not in {pid for _, pid in steps}
    assert {pid for s, pid in steps if s in accelerator} == {pids["w0"]}


def test_two_runs_of_one_job_at_once_each_execute_their_own_steps(scaleout, dask_graph):
    """The run queue starts several partitions of one stage at once, each in its own run worker,
    on the shared scheduler: each run's steps must execute for that run (dagster-dask's task keys
    alone, "<job>.<step>", would hand the second run the first run's task)."""
    parts = ("0|random_real", "1|random_real")
    procs = [subprocess.Popen([sys.executable, "-c", f"from tests.services import distill_on_dask; distill_on_dask({p!r})"],
                              cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}) for p in parts]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    for pk, (out, _) in zip(parts, outs):
        run_id = out.split()[-1]
        assert [s for s, _ in _step_pids(scaleout.instance, [run_id]) if s == "distilled_images"] == \
            ["distilled_images"], pk
        assert scaleout.instance.get_run_by_id(run_id).tags["dagster/partition"] == pk


def test_a_worker_killed_mid_step_is_replaced_and_the_step_rerun_with_the_same_outputs(scaleout, dask_graph, tmp_path):
    job, pk = _distill_partition(scaleout, "0|mgd3")
    set_dir = f"runs/{scaleout.cfg.name}/distilled/mgd3"
    before = _outputs(scaleout.home, set_dir)
    marker = tmp_path / "step-started"
    from tests.services import slow_down_distill

    with scaleout.cluster.client() as client:
        w0 = next(a for a, w in client.scheduler_info(n_workers=-1)["workers"].items() if w["name"] == "w0")
        pid = client.run(slow_down_distill, str(marker), 600, workers=[w0])[w0]
    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(result=demo.execute_on_dask(
        job, scaleout.instance, pk, [dg.AssetKey("distilled_images")], demo.run_config("WARNING"))))
    run.start()
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the step never started on w0"
    os.kill(pid, signal.SIGKILL)  # the worker process, mid-step; its nanny starts a fresh one
    run.join(300)
    success, run_id, failure = outcome["result"]
    assert success, failure
    starts = [p for s, p in _step_pids(scaleout.instance, [run_id]) if s == "distilled_images"]
    assert len(starts) == 2 and starts[0] == pid and starts[1] == scaleout.cluster.worker_pids()["w0"] != pid
    assert _outputs(scaleout.home, set_dir) == before


def test_a_step_dask_gives_up_on_fails_its_run_and_the_run_retry_policy_reexecutes_it(scaleout, dask_graph, tmp_path):
    """Past Dask's allowed-failures (0 here: the first lost worker) the run fails with KilledWorker;
    the instance's run retry policy (run_retries, deploy/dagster.yaml) has the daemon re-execute
    it from the failure, and cluster_demo.wait_for_runs follows the retry to its success."""
    from mgd3_assets import cluster_demo
    from tests.services import set_allowed_failures, slow_down_distill

    set_dir = f"runs/{scaleout.cfg.name}/distilled/mgd3"
    before = _outputs(scaleout.home, set_dir)
    marker, job = tmp_path / "step-started", scaleout.defs.resolve_job_def(demo.DISTILL_JOB)
    log = []
    with scaleout.cluster.client() as client:
        allowed = client.run_on_scheduler(set_allowed_failures, 0)
        try:
            w0 = next(a for a, w in client.scheduler_info(n_workers=-1)["workers"].items() if w["name"] == "w0")
            pid = client.run(slow_down_distill, str(marker), 600, workers=[w0])[w0]
            with cluster_demo.run_queue(scaleout.instance, tmp_path) as submitter:
                first = submitter.submit(demo.DISTILL_JOB, [dg.AssetKey("distilled_images")],
                                         demo.partition_tags(job, "0|mgd3"))
                deadline = time.time() + 180
                while not marker.exists() and time.time() < deadline:
                    time.sleep(0.2)
                assert marker.exists(), "the step never started on w0"
                os.kill(pid, signal.SIGKILL)  # mid-step; Dask may not rerun it (allowed-failures 0)
                ran = cluster_demo.wait_for_runs(scaleout.instance, {first: "0|mgd3"}, demo.DISTILL_JOB, log.append)
        finally:
            client.run_on_scheduler(set_allowed_failures, allowed)
    assert len(ran) == 2 and ran[0] == first, log
    failed, retry = (scaleout.instance.get_run_by_id(r) for r in ran)
    assert failed.status == dg.DagsterRunStatus.FAILURE and "KilledWorker" in cluster_demo.failure_text(
        scaleout.instance, first)
    assert retry.status == dg.DagsterRunStatus.SUCCESS and retry.parent_run_id == first
    assert retry.tags["dagster/partition"] == "0|mgd3" and "re-executes it as run" in log[0]
    restarted = scaleout.cluster.worker_pids()["w0"]
    assert [p for s, p in _step_pids(scaleout.instance, [retry.run_id]) if s == "distilled_images"] == [restarted]
    assert restarted != pid
    assert _outputs(scaleout.home, set_dir) == before


def test_two_runs_of_one_partition_at_once_take_turns_and_never_mix_outputs(scaleout, dask_graph, tmp_path):
    set_dir = f"runs/{scaleout.cfg.name}/distilled/mgd3"
    before = _outputs(scaleout.home, set_dir)
    timeline = tmp_path / "timeline"
    code = f"from tests.services import materialize_with_timeline as m; m('1|mgd3', {str(timeline)!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    events = [line.split() for line in timeline.read_text().splitlines()]
    first_done = min(float(t) for _, what, t in events if what == "done")
    # Both runs were inside distill_classes before either finished writing: they ran at once ...
    assert len({pid for pid, what, _ in events if what == "enter"}) == 2
    assert all(float(t) < first_done for _, what, t in events if what == "enter")
    # ... and the second wrote only after the first had finished (the class's lock).
    order = [(pid, what) for pid, what, _ in sorted(events, key=lambda e: float(e[2])) if what != "enter"]
    assert [w for _, w in order] == ["write", "done", "write", "done"] and order[0][0] == order[1][0]
    assert _outputs(scaleout.home, set_dir) == before  # the same bytes, not a mixture
    pngs = sorted((scaleout.home / set_dir).rglob("images/1/*.png"))
    assert pngs and all(lineage_of(p)["verified"] for p in pngs)


def test_the_demo_runs_a_stages_partitions_at_once_from_runner_processes(scaleout, dask_graph, monkeypatch):
    """make demo on Dask: a stage's runs execute MGD3_PARALLEL_RUNS at a time, each orchestrated by
    a runner process that loaded the code once, the steps on the workers, the same bytes."""
    monkeypatch.setenv(PARALLEL_ENV, "2")
    set_dir = f"runs/{scaleout.cfg.name}/distilled"
    before = _outputs(scaleout.home, set_dir)
    stage = next(s for s in demo.STAGES if s.job == demo.DISTILL_JOB)
    started, lines = datetime.datetime.now(datetime.timezone.utc), []
    [report] = demo.materialize_graph(scaleout.defs, scaleout.instance, force=True, stages=[stage],
                                      log=lines.append, log_level="WARNING")
    records = scaleout.instance.get_run_records(dg.RunsFilter(job_name=demo.DISTILL_JOB, created_after=started))
    # One run per method, each holding both classes (runs.classes_per_run "auto"), two at once.
    assert report.runs == len(records) == 2 and any("2 run(s)" in line and "2 at once" in line for line in lines)
    assert {r.dagster_run.status for r in records} == {dg.DagsterRunStatus.SUCCESS}
    assert sorted((r.dagster_run.tags["dagster/asset_partition_range_start"],
                   r.dagster_run.tags["dagster/asset_partition_range_end"]) for r in records) == \
        sorted((pk.start, pk.end) for pk in report.partitions) == [("0|mgd3", "1|mgd3"), ("0|random_real", "1|random_real")]
    # Both runs were handed out at once, one to each of two runner processes (neither this one),
    # their steps run by the workers. (Not asserted on start and end times: the random_real run
    # takes ~0.3 s and can end before the other run's process has recorded its start.)
    run_ids = [r.dagster_run.run_id for r in records]
    orchestrators = {r.event_log_entry.dagster_event.pid for run_id in run_ids
                     for r in scaleout.instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_START).records}
    assert len(orchestrators) == 2 and os.getpid() not in orchestrators
    assert {pid for _, pid in _step_pids(scaleout.instance, run_ids)} <= set(scaleout.cluster.worker_pids().values())
    assert _outputs(scaleout.home, set_dir) == before


def test_a_failed_run_among_parallel_ones_fails_the_stage_naming_its_partition_and_root_cause(
        scaleout, dask_graph, monkeypatch):
    from tests.services import fail_distill_of_class, restore_distill

    monkeypatch.setenv(PARALLEL_ENV, "2")
    set_dir = f"runs/{scaleout.cfg.name}/distilled"
    before = _outputs(scaleout.home, set_dir)
    stage = next(s for s in demo.STAGES if s.job == demo.DISTILL_JOB)
    with scaleout.cluster.client() as client:
        client.run(fail_distill_of_class, "1")
    try:
        with pytest.raises(demo.DemoError) as failed:
            demo.materialize_graph(scaleout.defs, scaleout.instance, force=True, stages=[stage],
                                   log=lambda m: None, log_level="WARNING")
    finally:
        with scaleout.cluster.client() as client:
            client.run(restore_distill)
    message = str(failed.value)
    # The run of both classes failed, naming the failed partition; class 0 was written and kept.
    assert message.startswith(f"{demo.DISTILL_JOB} 0|") and "failed (run " in message, message
    last = message.splitlines()[-1]
    assert last.startswith("RuntimeError: injected failure in class 1 (partition 1|"), message  # the root cause, last
    assert "1 other partition(s) of this run were materialized and are kept" in last, message
    after = _outputs(scaleout.home, set_dir)
    assert {k: v for k, v in after.items() if "/images/1/" in k} == {k: v for k, v in before.items() if "/images/1/" in k}


def test_the_workers_run_without_dasks_profiler_and_with_the_test_processs_torch_threads(scaleout):
    # The local clusters' Dask settings (local_cluster.dask_worker_config) reach the worker
    # processes, including the thread count that makes their results match this process's.
    import torch

    def settings():
        import dask

        return (dask.config.get("distributed.worker.profile.enabled"),
                dask.config.get("distributed.worker.memory.monitor-interval"), os.environ.get("OMP_NUM_THREADS"))

    with scaleout.cluster.client() as client:
        found = client.run(settings)
    assert len(found) == 2
    assert set(found.values()) == {(False, "1s", str(torch.get_num_threads()))}


def test_how_many_runs_the_demo_executes_at_once(scaleout, monkeypatch):
    monkeypatch.delenv(PARALLEL_ENV, raising=False)
    assert parallel_runs() == 1  # one worker of the test cluster has the accelerator resource
    monkeypatch.setenv(PARALLEL_ENV, "3")
    assert parallel_runs() == 3
    for bad in ("0", "two"):
        monkeypatch.setenv(PARALLEL_ENV, bad)
        with pytest.raises(ExecutorConfigError, match=f"{PARALLEL_ENV}='{bad}'"):
            parallel_runs()


def test_an_unreachable_postgres_is_one_clear_error_and_nothing_is_written(tmp_path):
    port, home = free_port(), tmp_path / "home"
    env = {**os.environ, "DAGSTER_HOME": str(DEPLOY), "DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(port),
           "DAGSTER_PG_USER": "dagster", "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_DB": "dagster",
           "MGD3_HOME": str(home), "MGD3_CONFIG": str(write_config(tmp_path / "tiny.yaml", tiny_config())),
           "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mgd3_assets.demo"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"PostgreSQL at 127.0.0.1:{port} is unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("unreachable") == 1
    assert not home.exists()


def test_the_executor_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("MGD3_EXECUTOR", raising=False)
    # Every run executes its steps in its own process, whoever launched it (not Dagster's default,
    # which starts a process per step, each loading the backbone again).
    assert build_executor() is dg.in_process_executor
    monkeypatch.setenv("MGD3_EXECUTOR", "dask")
    monkeypatch.setenv("MGD3_DASK_SCHEDULER", "tcp://10.0.0.1:8786")
    executor = build_executor()
    assert executor.name == "dask"
    resolved = executor.config_schema.resolve_config({}).value["config"]
    assert resolved == {"cluster": {"existing": {"address": "tcp://10.0.0.1:8786"}}}
    monkeypatch.setenv("MGD3_EXECUTOR", "spark")
    with pytest.raises(ExecutorConfigError, match="MGD3_EXECUTOR='spark': expected one of in_process, dask"):
        build_executor()


def test_comparing_two_storage_roots_sets_aside_wall_times_and_the_hash_cache_only(tmp_path):
    from mgd3_assets.cluster_demo import compare_homes

    def home(name, seconds, png=b"\x89PNG1", acc="91.4"):
        root = tmp_path / name
        for rel, data in {"runs/x/distilled/a.png": png,
                          "runs/x/students/mgd3.csv": f"method,final_acc,seconds\nmgd3,{acc},{seconds}\n".encode(),
                          "runs/x/students/runs/k.json": f'{{"row": {{"final_acc": {acc}, "seconds": {seconds}}}}}'.encode(),
                          f"cache/fingerprints/{seconds}.json": b"{}"}.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return root

    a = home("a", 12.5)
    assert compare_homes(a, home("b", 40.1)) == ([], ["runs/x/students/mgd3.csv", "runs/x/students/runs/k.json"], 1)
    differences, _, identical = compare_homes(a, home("c", 12.5, png=b"\x89PNG2", acc="91.5"))
    assert identical == 0
    assert differences == ["differs: runs/x/distilled/a.png", "differs: runs/x/students/mgd3.csv",
                           "differs: runs/x/students/runs/k.json"]


def test_an_instance_on_postgres_keeps_its_connections_open_until_disposed(scaleout):
    # dagster-postgres alone connects anew for every query (the server forks a process each
    # time); a run's worth of reads and writes must reuse the instance's open connections.
    from sqlalchemy import event

    from mgd3_assets.dagster_private import pg_engine

    instance = dg.DagsterInstance.from_config(str(DEPLOY))
    storages = {"runs": instance.run_storage, "events": instance.event_log_storage,
                "schedules": instance.schedule_storage}
    engines = {name: pg_engine(storage) for name, storage in storages.items()}
    connects = dict.fromkeys(engines, 0)
    for name, engine in engines.items():
        engine.dispose()  # shared with the module's instance: start without an open connection
        event.listen(engine, "connect", lambda *_, name=name: connects.__setitem__(name, connects[name] + 1))
    run = instance.create_run_for_job(dg.GraphDefinition("connections").to_job())
    for _ in range(21):
        instance.report_engine_event("connection test", run)
        instance.get_runs(limit=5)
        instance.all_logs(run.run_id)
        instance.all_instigator_state()
    assert len(instance.all_logs(run.run_id)) == 21
    assert connects == {"runs": 1, "events": 1, "schedules": 1}  # 85+ queries each, one connection
    # A Dask worker makes an instance per step: the next one shares the engines, and disposing
    # an instance closes their idle connections, which the next query opens again.
    instance.dispose()
    assert engines["runs"].pool.checkedin() == 0 and engines["events"].pool.checkedin() == 0
    with dg.DagsterInstance.from_config(str(DEPLOY)) as again:
        assert pg_engine(again.run_storage) is engines["runs"]
        assert len(again.all_logs(run.run_id)) == 21
    assert connects["events"] == 2 and engines["events"].pool.checkedin() == 0
