"""``make cluster-demo``: the demo's graph on a local cluster, the way a real deployment runs it.

    python -m mgd3_assets.cluster_demo [--config configs/x.yaml] [--workers 2] [--compare HOME]

Starts, on 127.0.0.1 only: a throw-away PostgreSQL server (the Dagster instance,
``deploy/dagster.yaml``), a Dask scheduler and single-thread workers (each advertising one
``accelerator``), and the Dagster daemon. Then, stage by stage, it submits the runs of the
partitions that are missing or stale, grouped as a backfill groups them (``demo.plan_stage``,
``runs.classes_per_run`` classes per run), through the instance's run queue; the daemon starts up to
``max_concurrent_runs`` of them at once, and each run's steps go to the Dask workers. It waits
for each stage, prints its time and which worker ran how many steps, and at the end (also on
failure, Ctrl-C or SIGTERM) stops everything it started.

Outputs go to ``$MGD3_HOME`` (default ``<repo>/mgd3_home_cluster``, beside ``make demo``'s
``mgd3_home``) and are the same bytes as ``make demo``'s: the workers use the torch thread count
``make demo`` uses (``--torch-threads``). ``--compare HOME`` checks that file by file.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import dagster as dg

from mgd3_core.config import PROJECT_ROOT, load_config

from . import demo
from .dagster_private import job_subset_selector, workspace_process_context
from .local_cluster import DaskCluster, PostgresServer, ServiceWatch, start_process, stop_process

DEPLOY = PROJECT_ROOT / "deploy"
TERMINAL = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}

# What a run writes under the storage root, compared file by file: not Dagster's own files
# (instance, step logs), lock files, the weight-hash cache (keyed by each file's inode and mtime),
# nor the backbone's training.json (it records wall times).
SKIP_PARTS = {"dagster", ".locks", ".staging", "cache"}
SKIP_NAMES = {"training.json"}
WALL_TIME_FIELD = "seconds"  # students' results record how long each run took


def output_files(home: Path, under: str = "") -> dict[str, bytes]:
    """{path relative to ``home``: bytes} of the outputs under ``home/under``."""
    out = {}
    for p in sorted((Path(home) / under).rglob("*")):
        rel = p.relative_to(home)
        if p.is_file() and not SKIP_PARTS & set(rel.parts) and p.name not in SKIP_NAMES \
                and not p.name.endswith(".lock"):
            out[str(rel)] = p.read_bytes()
    return out


def without_wall_times(name: str, data: bytes):
    """A CSV's rows without its ``seconds`` column, a JSON document without ``seconds`` keys;
    None for other files."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != WALL_TIME_FIELD}
        return [strip(v) for v in x] if isinstance(x, list) else x

    if name.endswith(".json"):
        return strip(json.loads(data))
    if name.endswith(".csv"):
        return [{k: v for k, v in row.items() if k != WALL_TIME_FIELD}
                for row in csv.DictReader(io.StringIO(data.decode()))]
    return None


class Comparison(NamedTuple):
    differences: list[str]  # empty: the same outputs, wall times aside
    timing_only: list[str]  # files whose bytes differ only in wall-time fields
    identical: int  # files with the same bytes


def compare_homes(mine: Path, other: Path) -> Comparison:
    """How two storage roots' outputs compare, file by file."""
    a, b = output_files(mine), output_files(other)
    common = sorted(a.keys() & b.keys())
    differ = [k for k in common if a[k] != b[k]]
    timing = []
    for k in differ:
        stripped = without_wall_times(k, a[k])
        if stripped is not None and stripped == without_wall_times(k, b[k]):
            timing.append(k)
    return Comparison([f"only in {mine}: {k}" for k in sorted(a.keys() - b.keys())]
                      + [f"only in {other}: {k}" for k in sorted(b.keys() - a.keys())]
                      + [f"differs: {k}" for k in differ if k not in timing],
                      timing, len(common) - len(differ))


class Submitter:
    """Creates runs of the code location's jobs and submits them to the instance's run queue,
    as ``dagster job launch`` and the UI do (through a workspace of ``workspace.yaml``)."""

    def __init__(self, instance: dg.DagsterInstance):
        self.instance = instance
        self._process = workspace_process_context(instance, str(PROJECT_ROOT / "workspace.yaml"))
        self.workspace = self._process.create_request_context()
        self.location = self.workspace.get_code_location(self.workspace.code_location_names[0])
        self.repo = next(iter(self.location.get_repositories().values()))

    def submit(self, job_name: str, keys, tags: dict) -> str:
        selector = job_subset_selector(self.location.name, self.repo.name, job_name, keys)
        job = self.location.get_job(selector)
        plan = self.location.get_execution_plan(job, {}, step_keys_to_execute=None, known_state=None,
                                                instance=self.instance).execution_plan_snapshot
        run = self.instance.create_run(
            job_name=job_name, run_id=None, run_config={}, resolved_op_selection=job.resolved_op_selection,
            step_keys_to_execute=plan.step_keys_to_execute, op_selection=None, status=None, root_run_id=None,
            parent_run_id=None, tags={**job.tags, **tags}, job_snapshot=job.job_snapshot,
            execution_plan_snapshot=plan, parent_job_snapshot=job.parent_job_snapshot,
            remote_job_origin=job.get_remote_origin(), job_code_origin=job.get_python_origin(),
            asset_selection=frozenset(keys), asset_check_selection=frozenset(), asset_graph=self.repo.asset_graph)
        return self.instance.submit_run(run.run_id, self.workspace).run_id

    def stop_sensors(self) -> None:
        """The automation sensor would request the same partitions again as the runs it sees finish:
        this demo submits every run itself, so the daemon only dequeues and launches them."""
        for sensor in self.repo.get_sensors():
            self.instance.stop_sensor(sensor.get_remote_origin_id(), sensor.selector_id, sensor)

    def close(self) -> None:
        self._process.__exit__(None, None, None)


def step_pids(instance: dg.DagsterInstance, run_ids) -> list[int]:
    """The pid of the process that started each step of the runs (one entry per STEP_START)."""
    return [r.event_log_entry.dagster_event.pid for run_id in run_ids
            for r in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_START).records]


def run_stage(defs, instance, submitter: Submitter, stage: demo.Stage, log=print,
              keep=None) -> tuple[float, list[str]]:
    """Submit every planned run of ``stage`` (missing or stale partitions, grouped as a backfill
    groups them; those ``keep(partition key or range)`` accepts, when given) at once and wait for
    all of them."""
    todo = [(pk, keys) for pk, keys in demo.plan_stage(defs, instance, stage) if keep is None or keep(pk)]
    if not todo:
        log(f"== {stage.job}: {', '.join(stage.assets)} up to date")
        return 0.0, []
    job = defs.resolve_job_def(stage.job)
    log(f"== {stage.job}: submitting {len(todo)} run(s)")
    t0 = time.perf_counter()
    runs = {submitter.submit(stage.job, keys, {demo.LAUNCHED_BY: "cluster-demo", **demo.partition_tags(job, pk)}): pk
            for pk, keys in todo}
    ran = wait_for_runs(instance, runs, stage.job, log, t0)
    return time.perf_counter() - t0, ran


def wait_for_runs(instance: dg.DagsterInstance, runs: dict[str, str | None], job: str, log=print,
                  t0: float | None = None) -> list[str]:
    """Wait until each submitted run ({run id: partition}) or the run that retries it succeeds;
    returns every run that ran, retries included. A failed run the instance's run retry policy
    (``run_retries``) re-executes is followed to its retry; any other failure raises DemoError."""
    t0 = time.perf_counter() if t0 is None else t0
    runs, pending, ran, succeeded = dict(runs), set(runs), [], 0
    while pending:
        time.sleep(1.0)
        for run_id in list(pending):
            run = instance.get_run_by_id(run_id)
            if run.status not in TERMINAL:
                continue
            pk = runs[run_id]
            if run.status == dg.DagsterRunStatus.SUCCESS:
                succeeded += 1
                log(f"   [{succeeded}/{len(set(runs.values()))}] {job} {demo.describe(pk)}: "
                    f"{time.perf_counter() - t0:.1f} s since submission")
            else:
                retry = retry_run_id(run)
                if retry is None:
                    raise demo.DemoError(f"{job} {demo.describe(pk)} {run.status.value} (run {run_id}):\n"
                                         f"{failure_text(instance, run_id)}")
                if not retry:
                    continue  # the daemon will retry it but has not launched the retry yet
                log(f"   {job} {demo.describe(pk)}: run {run_id} failed "
                    f"({failure_text(instance, run_id).splitlines()[0]}); the run retry policy "
                    f"(run_retries in deploy/dagster.yaml) re-executes it as run {retry}")
                runs[retry] = pk
                pending.add(retry)
            pending.discard(run_id)
            ran.append(run_id)
    return ran


# Run tags the instance and the daemon set on a failed run (dagster.yaml's run_retries).
WILL_RETRY_TAG, RETRY_RUN_TAG = "dagster/will_retry", "dagster/auto_retry_run_id"


def retry_run_id(run: dg.DagsterRun) -> str | None:
    """For a failed run: the id of the run that retries it, "" while the daemon has yet to
    launch that retry, None when the run will not be retried (no retries left, or a step failed)."""
    if run.tags.get(WILL_RETRY_TAG, "").lower() != "true":
        return None
    return run.tags.get(RETRY_RUN_TAG, "")


def failure_text(instance: dg.DagsterInstance, run_id: str) -> str:
    lines = []
    for record in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records:
        event = record.event_log_entry.dagster_event
        lines.append(f"{event.step_key}: {event.event_specific_data.error.message.strip()}")
    if not lines:  # no step failed: the run itself did (e.g. Dask gave up on a step: KilledWorker)
        for record in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records:
            error = getattr(record.event_log_entry.dagster_event.event_specific_data, "error", None)
            if error is not None:
                lines.append(f"{error.cls_name}: {error.message.strip()}")
    return "\n".join(lines) or "see the run's events (dagster-daemon log, or make ui with DAGSTER_HOME=deploy)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="experiment YAML (default: $MGD3_CONFIG or configs/embedded.yaml)")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers, one thread and one accelerator each")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads per worker (default: what make demo uses here, for identical bytes)")
    parser.add_argument("--compare", type=Path, help="a storage root (e.g. make demo's) whose outputs must be equal")
    args = parser.parse_args(argv)
    if args.config:
        os.environ["MGD3_CONFIG"] = str(Path(args.config).resolve())
    os.environ.setdefault("MGD3_HOME", str(PROJECT_ROOT / "mgd3_home_cluster"))
    # SIGTERM (and the Makefile's recipe being killed) unwinds like Ctrl-C: every service stops.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _run(args)
    except demo.DemoError as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: stopped every service started", file=sys.stderr)
        return 130


@contextlib.contextmanager
def local_deployment(n_workers: int, torch_threads: int, logs: Path):
    """PostgreSQL, a Dask cluster of ``n_workers`` (1 thread, 1 ``accelerator`` each) and this
    process's environment pointing Dagster at them; yields (pg, cluster); stops both at exit."""
    workers = {f"w{i}": {"accelerator": 1} for i in range(n_workers)}
    saved = dict(os.environ)
    with PostgresServer() as pg:
        env = {**pg.env(), "DAGSTER_HOME": str(DEPLOY), "MGD3_EXECUTOR": "dask",
               "MGD3_HOME": os.environ["MGD3_HOME"], "PYTHONPATH": str(PROJECT_ROOT)}
        if os.environ.get("MGD3_CONFIG"):
            env["MGD3_CONFIG"] = os.environ["MGD3_CONFIG"]
        with DaskCluster(workers, env=env, torch_threads=torch_threads, log_dir=logs) as cluster:
            os.environ.update(env, MGD3_DASK_SCHEDULER=cluster.address)
            try:
                yield pg, cluster
            finally:
                os.environ.clear()
                os.environ.update(saved)


@contextlib.contextmanager
def run_queue(instance: dg.DagsterInstance, logs: Path):
    """A ``Submitter`` on ``instance`` and the Dagster daemon that dequeues and launches its runs."""
    submitter = Submitter(instance)
    submitter.stop_sensors()
    watch = ServiceWatch()
    daemon = start_process("dagster-daemon", [str(Path(sys.executable).with_name("dagster-daemon")), "run",
                                              "-w", str(PROJECT_ROOT / "workspace.yaml")], logs, dict(os.environ))
    watch.group(daemon)
    try:
        yield submitter
    finally:
        stop_process(daemon)
        watch.close()
        submitter.close()


def _run(args) -> int:
    import torch

    threads = args.torch_threads or torch.get_num_threads()
    cfg = load_config()
    logs = Path(tempfile.mkdtemp(prefix="mgd3-cluster-demo-"))
    t0 = time.perf_counter()
    with local_deployment(args.workers, threads, logs) as (pg, cluster):
        print(f"MGD3 cluster demo: experiment {cfg.name!r}, storage root {os.environ['MGD3_HOME']}\n"
              f"   PostgreSQL 127.0.0.1:{pg.port}, Dask {cluster.address} ({args.workers} workers x 1 thread, "
              f"torch threads {threads}), logs in {logs}", flush=True)
        report = _materialize(cluster, logs)
    print("\n== timings (submission to the stage's last run finished)")
    for job, seconds, runs, split in report:
        shares = ", ".join(f"{w}: {n}" for w, n in sorted(split.items())) or "-"
        print(f"   {job:<14} {runs:>4} run(s) {seconds:8.1f} s   steps per worker: {shares}")
    total_split = sum((Counter(s) for *_, s in report), Counter())
    print(f"   {'total':<14} {sum(r[2] for r in report):>4} run(s) {time.perf_counter() - t0:8.1f} s   "
          f"steps per worker: {', '.join(f'{w}: {n}' for w, n in sorted(total_split.items()))}")
    if args.compare:
        diffs, timing, same = compare_homes(Path(os.environ["MGD3_HOME"]), args.compare)
        print(f"\n== outputs vs {args.compare}: " + (
            f"{same} file(s) byte-identical, {len(timing)} differing only in wall times ({WALL_TIME_FIELD})"
            if not diffs else f"{len(diffs)} difference(s)"))
        for line in diffs[:20]:
            print("   " + line)
        return 1 if diffs else 0
    return 0


def worker_split(cluster: DaskCluster, instance: dg.DagsterInstance, run_ids) -> Counter:
    """{worker name: steps it started} over the runs."""
    names = {pid: name for name, pid in cluster.worker_pids().items()}
    return Counter(names.get(pid, f"pid {pid}") for pid in step_pids(instance, run_ids))


def _materialize(cluster: DaskCluster, logs: Path) -> list:
    from .definitions import build_definitions

    defs = build_definitions()
    report = []
    with dg.DagsterInstance.get() as instance, run_queue(instance, logs) as submitter:
        for stage in (s for s in demo.STAGES if demo.has_stage(defs, s)):
            seconds, run_ids = run_stage(defs, instance, submitter, stage, log=lambda m: print(m, flush=True))
            report.append((stage.job, seconds, len(run_ids), worker_split(cluster, instance, run_ids)))
        print("\n== results\n" + demo.results_text(instance))
    return report


if __name__ == "__main__":
    sys.exit(main())
