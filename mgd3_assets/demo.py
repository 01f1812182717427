"""``make demo``: materialize the whole asset graph of the configured experiment.

    python -m mgd3_assets.demo [--config configs/x.yaml] [--force]

Runs every stage in dependency order, one in-process run per chunk of up to
``runs.classes_per_run`` partitions (as a UI backfill groups them), into
the persistent instance (``$DAGSTER_HOME``, default the repository root, whose
``dagster.yaml`` keeps the instance under ``$MGD3_HOME/dagster``), so ``make ui``
shows everything afterwards. All runs happen in this one Python process, so the
backbone is loaded once and reused by every partition. With ``MGD3_EXECUTOR=dask``
(``mgd3_assets/executors.py``) each run's steps go to the Dask cluster instead, and a
stage's runs execute several at once from runner processes that load the code once
(``run_pool.py``: ``MGD3_PARALLEL_RUNS``, default one per accelerator worker);
``make cluster-demo`` submits them through the daemon's run queue instead.

Only what is missing or stale is run (as the UI's "Materialize unsynced"): a
second ``make demo`` with nothing changed runs nothing, and after a class is
added under a pretrained backbone only that class and the gathering assets run
(the embedded backbone's key holds the class list: it retrains, and everything
after it with it). ``--force`` re-runs all.
At the end it prints the results table and where the report is.

Two demos on one storage root never run at once: the second waits for the
first (``<storage root>/demo.lock`` names its pid and host), then runs only
what is still missing. A failure ends with its root cause on the last line
(``DatasetError: class 'delta' has no usable image in ...``); a bad config,
dataset or storage root found before any run prints that one line and exits 2.
"""

import argparse
import contextlib
import json
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from mgd3_core.config import PROJECT_ROOT, ConfigError, load_config
from mgd3_core.data import DatasetError
from mgd3_core.latents import LatentStoreError
from mgd3_core.locks import LockedError, file_lock
from mgd3_core.storage import demo_lock_file, storage_root

from .automation import DEMO_RUN_TAG
from .dagster_private import is_fresh, stale_status_resolver
from .dagster_private import reconstructable_job as private_reconstructable_job
from .executors import ExecutorConfigError, uses_dask
from .failures import exception_line, root_cause_line
from .instance import PostgresUnreachable, storage_is_a_server
from .jobs import (BACKBONE_JOB, DATASET_JOB, DISTILL_JOB, METHOD_SETTINGS_JOB, ENCODE_JOB, MODES_JOB, REPORTS_JOB,
                   STUDENTS_JOB, TEACHER_JOB, VARIANT_MODES_JOB)
from .run_pool import RunnerPool, parallel_runs
from .run_ranges import chunk_runs, describe, partition_tags  # noqa: F401  (demo.partition_tags: cluster_demo, tests)


@dataclass(frozen=True)
class Stage:
    job: str
    assets: tuple[str, ...]


# Observed first, every time (cheap): an edited image or a changed sampler setting then
# shows as stale partitions of exactly its class or its methods.
INPUT_STAGES = (
    Stage(DATASET_JOB, ("dataset",)),
    Stage(METHOD_SETTINGS_JOB, ("method_settings",)),
)
STAGES = (
    *INPUT_STAGES,
    Stage(BACKBONE_JOB, ("backbone",)),
    Stage(ENCODE_JOB, ("latent_store",)),
    Stage(MODES_JOB, ("mode_centroids",)),
    Stage(VARIANT_MODES_JOB, ("variant_modes",)),  # only in a graph with such variants (has_stage)
    Stage(DISTILL_JOB, ("distilled_images",)),
    Stage(TEACHER_JOB, ("teacher", "full_data_students")),
    Stage(STUDENTS_JOB, ("students",)),
    Stage(REPORTS_JOB, ("diversity_report", "evaluation_report")),
)


def has_stage(defs: dg.Definitions, stage: Stage) -> bool:
    """Whether the graph has the stage's assets (``variant_modes`` only when a method variant
    chooses a mode finder of its own)."""
    return defs.resolve_asset_graph().has(dg.AssetKey(stage.assets[0]))


def stage_of(asset: str) -> Stage:
    """The stage that materializes ``asset``."""
    return next(s for s in STAGES if asset in s.assets)


def run_config(log_level: str = "INFO") -> dict:
    """Step logs on the console at ``log_level``: INFO shows progress lines and failures,
    not Dagster's DEBUG event stream."""
    return {"loggers": {"console": {"config": {"log_level": log_level}}}}


# Tags of every demo run: who launched it, and which process on which host (release_abandoned_runs).
LAUNCHED_BY, PID, HOST = DEMO_RUN_TAG, "mgd3/pid", "mgd3/host"


@dataclass
class StageReport:
    job: str
    runs: int = 0
    seconds: float = 0.0
    partitions: list = field(default_factory=list)
    peak_rss_mib: float = float("nan")  # of this stage alone (the kernel's high-water mark, reset per stage)
    peak_device_mib: float | None = None  # peak CUDA memory, where there is a GPU
    in_graph: bool = True  # False: the graph has no such stage (variant_modes without such variants)


class DemoError(RuntimeError):
    """A run failed; the message names the job, the partition and the error."""


def plan_stage(defs: dg.Definitions, instance: dg.DagsterInstance, stage: Stage, force: bool = False):
    """[(what, [asset keys to run])] for one stage's runs: its missing or stale partitions (or all),
    grouped as a backfill groups them (``chunk_runs``). ``what``: None (an unpartitioned run), a
    partition key, or a ``dg.PartitionKeyRange`` of several."""
    if not has_stage(defs, stage):
        return []
    graph = defs.resolve_asset_graph()
    keys = [dg.AssetKey(a) for a in stage.assets]
    node = graph.get(keys[0])
    if not node.is_materializable:  # observed inputs, a pretrained backbone: observe every time (cheap)
        return [(None, keys)]
    partitions = node.partitions_def.get_partition_keys() if node.partitions_def else [None]
    resolver = stale_status_resolver(defs, instance)
    plan = []
    for pk in partitions:
        todo = []
        for k in keys:  # a stage's assets are in dependency order
            # A key whose parent in this stage is about to re-run: Dagster calls it fresh until
            # that parent has new data, but it will be stale once the stage's run has made it.
            parent_runs = any(p in todo for p in graph.get(k).parent_keys)
            if force or parent_runs or not is_fresh(resolver, k, pk):
                todo.append(k)
        if todo:
            plan.append((pk, todo))
    policy = node.backfill_policy
    if policy is None or not node.partitions_def or len(plan) < 2:
        return plan
    return chunk_runs(node.partitions_def, plan, policy.max_partitions_per_run or len(plan))


def run_stage(defs: dg.Definitions, instance: dg.DagsterInstance, stage: Stage, *, force: bool = False,
              log=print, log_level: str = "INFO", runners: RunnerPool | None = None) -> StageReport:
    """Every missing or stale partition of ``stage``: one run after another in this process, or,
    with ``runners`` (on Dask), as many at once as there are runner processes."""
    report = StageReport(stage.job)
    if not has_stage(defs, stage):
        return report
    job = defs.resolve_job_def(stage.job)
    todo = plan_stage(defs, instance, stage, force)
    if not todo:
        log(f"== {stage.job}: {', '.join(stage.assets)} up to date")
        return report
    at_once = f", {min(runners.size, len(todo))} at once" if runners is not None and len(todo) > 1 else ""
    log(f"== {stage.job}: {len(todo)} run(s) for {', '.join(stage.assets)}{at_once}")
    t0 = time.perf_counter()

    def done(result) -> None:
        pk, keys, success, run_id, failure, seconds = result
        if success:
            report.partitions.append(pk)
            log(f"   [{len(report.partitions)}/{len(todo)}] {stage.job} {describe(pk)} "
                f"({', '.join(k.to_user_string() for k in keys)}): {seconds:.1f} s")

    if runners is not None and len(todo) > 1:
        results = runners.run_all(stage.job, todo, run_config(log_level), _run_tags(), on_done=done)
    else:
        results = []
        for pk, keys in todo:
            t = time.perf_counter()
            if uses_dask():
                outcome = execute_on_dask(job, instance, pk, keys, run_config(log_level), _run_tags())
            else:
                outcome = _execute_in_process(job, instance, pk, keys, run_config(log_level))
            results.append((pk, keys, *outcome, time.perf_counter() - t))
            done(results[-1])
            if not outcome[0]:
                break
    for pk, _, success, run_id, failure, _ in results:
        if not success:  # the root cause last: it is what a user reads first
            raise DemoError(f"{stage.job} {describe(pk)} failed (run {run_id}; its full trace is in the UI, "
                            f"`make ui`):\n{failure}")
    report.runs = len(todo)
    report.seconds = time.perf_counter() - t0
    return report


def _execute_in_process(job, instance, pk, keys, config) -> tuple[bool, str, str]:
    single = pk if pk is None or isinstance(pk, str) else None
    tags = {**_run_tags(), **(partition_tags(job, pk) if single is None and pk is not None else {})}
    # The stand-alone check steps stay out: the assets evaluate their checks per partition.
    result = job.get_subset(asset_selection=set(keys), asset_check_selection=set()).execute_in_process(
        instance=instance, partition_key=single, run_config=config, raise_on_error=False, tags=tags)
    return result.success, result.run_id, "" if result.success else _failure_text(result)


def reconstructable_job(name: str):
    """A job other processes (run workers, Dask workers) can load: ``mgd3_assets.definitions:defs``,
    built there from the same ``MGD3_CONFIG`` / ``MGD3_HOME`` as here."""
    return private_reconstructable_job("mgd3_assets.definitions", "defs", name, str(PROJECT_ROOT))


def execute_on_dask(job, instance, pk, keys, config, tags: dict | None = None) -> tuple[bool, str, str]:
    """One run of ``job`` for partition ``pk`` with the job's executor (Dask): the steps run on the
    workers, this process orchestrates (execute_in_process would run them here). ``tags``: the
    demo's (who launched the run), by default this process's."""
    tags = _run_tags() if tags is None else tags
    # The stand-alone check steps stay out: the assets evaluate their checks per partition.
    subset = reconstructable_job(job.name).get_subset(asset_selection=set(keys), asset_check_selection=set())
    with dg.execute_job(subset, instance, run_config=config,
                        tags={**tags, **partition_tags(job, pk)}, raise_on_error=False) as result:
        return result.success, result.run_id, "" if result.success else _failure_text(result)


def _run_tags() -> dict:
    return {LAUNCHED_BY: "demo", PID: str(os.getpid()), HOST: socket.gethostname()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_abandoned_runs(instance: dg.DagsterInstance, log=print) -> list[str]:
    """End the runs of an earlier demo on this host whose process died without ending them.

    A demo stopped by Ctrl-C or SIGTERM fails its run and frees its slot itself; one killed
    with SIGKILL (or by a power cut) leaves its run "started", still holding the accelerator
    pool's only slot, and every later accelerator step would wait for that slot forever.
    """
    released = []
    active = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.NOT_STARTED]
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=active, tags={LAUNCHED_BY: "demo"})):
        pid = run.tags.get(PID, "")
        if run.tags.get(HOST) == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            instance.report_run_failed(run, message=f"the demo process {pid} that ran it is gone")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            log(f"released run {run.run_id} of a demo process ({pid}) that no longer exists")
            released.append(run.run_id)
    return released


def _failure_text(result: dg.ExecuteInProcessResult) -> str:
    """What failed: per failed step "in step <key>:" and then its root cause on a line of its own
    (see ``failures``), so the last line of a failed demo is a root cause; failed checks too."""
    lines = []
    for event in result.all_events:
        data = event.event_specific_data
        if event.is_step_failure:
            lines += [f"in step {event.step_key}:", root_cause_line(event) or "see the run in the UI"]
        elif event.event_type_value == "ASSET_CHECK_EVALUATION" and not data.passed:
            lines.append(f"check {data.asset_check_key.name} failed: {data.description}")
    return "\n".join(lines) or "see the run's logs in the UI"


def materialize_graph(defs: dg.Definitions, instance: dg.DagsterInstance, *, force: bool = False,
                      stages=STAGES, log=print, log_level: str = "INFO") -> list[StageReport]:
    """Run every stage in order (each plans against the results of the ones before it)."""
    from mgd3_core.peak_memory import PeakMemory

    reports = []
    parallel = parallel_runs() if uses_dask() else 1
    with contextlib.ExitStack() as stack:
        runners = None
        if parallel > 1:
            log(f"starting {parallel} runner processes: each stage runs up to {parallel} partitions at once")
            runners = stack.enter_context(RunnerPool(parallel))
        for stage in stages:
            if not has_stage(defs, stage):  # one report per stage all the same: reports[i] is stages[i]'s
                reports.append(StageReport(stage.job, in_graph=False))
                continue
            with PeakMemory() as peak:
                report = run_stage(defs, instance, stage, force=force, log=log, log_level=log_level, runners=runners)
            report.peak_rss_mib, report.peak_device_mib = peak.rss_mib, peak.device_mib
            reports.append(report)
    return reports


def latest_metadata(instance: dg.DagsterInstance, asset: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return {}
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def results_text(instance: dg.DagsterInstance) -> str:
    meta = latest_metadata(instance, "evaluation_report")
    if not meta:
        return "No evaluation report materialized."
    parts = [str(meta.get("results_table", "")).strip()]
    if meta.get("variants_table"):  # methods beyond the six base names, ranked by base method
        parts.append("\n" + str(meta["variants_table"]).strip() + "\n")
    for key in ("report_html", "report_markdown", "report_dir"):
        if key in meta:
            parts.append(f"{key.replace('_', ' ')}: {meta[key]}")
    return "\n".join(p for p in parts if p)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML (default: $MGD3_CONFIG or configs/embedded.yaml)")
    parser.add_argument("--force", action="store_true", help="re-materialize everything, not only what is unsynced")
    parser.add_argument("--profile-json", metavar="PATH",
                        help="also write each stage's runs, wall time and peak memory to this JSON file")
    args = parser.parse_args(argv)
    if args.config:
        os.environ["MGD3_CONFIG"] = args.config
    os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT))
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    try:
        return _run(args.force, args.profile_json)
    except (ConfigError, DatasetError, ExecutorConfigError, LatentStoreError, LockedError, OSError) as e:
        # A bad config, dataset or storage root: the message says what to fix; a traceback would
        # only bury it. (Errors inside a run are reported by the run, see _failure_text.)
        print(exception_line(e), file=sys.stderr)
        return 2


def _print_timings(reports: list[StageReport], total: float, profile_json: str | None) -> None:
    reports = [r for r in reports if r.in_graph]
    print("\n== timings (peak RSS of each stage; peak GPU memory where there is one)")
    for r in reports:
        gpu = f" {r.peak_device_mib:9.0f} MiB GPU" if r.peak_device_mib is not None else ""
        print(f"   {r.job:<14} {r.runs:>4} run(s) {r.seconds:8.1f} s {r.peak_rss_mib:9.0f} MiB RSS{gpu}")
    print(f"   {'total':<14} {sum(r.runs for r in reports):>4} run(s) {total:8.1f} s "
          f"{max(r.peak_rss_mib for r in reports):9.0f} MiB RSS")
    if profile_json:
        rows = [{"job": r.job, "runs": r.runs, "seconds": r.seconds, "peak_rss_mib": r.peak_rss_mib,
                 "peak_device_mib": r.peak_device_mib} for r in reports]
        Path(profile_json).write_text(json.dumps({"total_seconds": total, "stages": rows}, indent=2))


def _say(message: str) -> None:
    print(message, flush=True)


def _run(force: bool, profile_json: str | None = None) -> int:
    # A bad config fails here in a second or two: the definitions (torch, diffusers) load below.
    cfg = load_config()
    home = storage_root()
    # A PostgreSQL instance is opened first: an unreachable server fails here, naming host and
    # port, before anything is written and before the definitions import torch and diffusers.
    # A file-based one lives under the storage root and is opened after the demo lock.
    try:
        server = dg.DagsterInstance.get() if storage_is_a_server() else None
    except PostgresUnreachable as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    try:
        from .definitions import build_definitions

        defs = build_definitions()
    except BaseException:
        if server is not None:
            server.dispose()
        raise
    # One demo at a time per storage root: a second one waits, then finds everything up to
    # date. Creating the lock file is also the demo's first write, so a read-only or full
    # storage root fails here, before any work, naming the path and the OS error.
    lock = demo_lock_file(home)
    with file_lock(lock, timeout=None, on_wait=lambda holder: _say(
            f"waiting for the demo already running on {home} ({holder}; lock {lock}) to finish")):
        t0 = time.perf_counter()
        with server or dg.DagsterInstance.get() as instance:
            _say(f"MGD3 demo: experiment {cfg.name!r}, Dagster instance {os.environ['DAGSTER_HOME']} "
                 f"(files in {instance.storage_directory()})")
            release_abandoned_runs(instance, log=_say)
            try:
                reports = materialize_graph(defs, instance, force=force, log=_say)
            except DemoError as e:
                print(f"\nFAILED: {e}", file=sys.stderr)
                return 1
            total = time.perf_counter() - t0
            _print_timings(reports, total, profile_json)
            print("\n== results\n" + results_text(instance))
    return 0


if __name__ == "__main__":
    sys.exit(main())
