"""``make demo``: materialize the whole asset graph of the configured experiment.

    python -m mgd3_assets.demo [--config configs/x.yaml] [--force]

Runs every stage in dependency order, one in-process run per partition, into
the persistent instance (``$DAGSTER_HOME``, default the repository root, whose
``dagster.yaml`` keeps the instance under ``$MGD3_HOME/dagster``), so ``make ui``
shows everything afterwards. All runs happen in this one Python process, so the
backbone is loaded once and reused by every partition.

Only what is missing or stale is run (as the UI's "Materialize unsynced"): a
second ``make demo`` with nothing changed runs nothing, and after a class is
added only that class and the gathering assets run. ``--force`` re-runs all.
At the end it prints the results table and where the report is.
"""

import argparse
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field

import dagster as dg

from mgd3_core.config import PROJECT_ROOT, load_config

from .automation import DEMO_RUN_TAG
from .dagster_private import is_fresh, stale_status_resolver
from .jobs import (BACKBONE_JOB, DATASET_JOB, DISTILL_JOB, METHOD_SETTINGS_JOB, PER_CLASS_JOB, REPORTS_JOB,
                   STUDENTS_JOB, TEACHER_JOB)


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
    Stage(PER_CLASS_JOB, ("latent_store", "mode_centroids")),
    Stage(DISTILL_JOB, ("distilled_images",)),
    Stage(TEACHER_JOB, ("teacher", "full_data_students")),
    Stage(STUDENTS_JOB, ("students",)),
    Stage(REPORTS_JOB, ("diversity_report", "evaluation_report")),
)


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


class DemoError(RuntimeError):
    """A run failed; the message names the job, the partition and the error."""


def plan_stage(defs: dg.Definitions, instance: dg.DagsterInstance, stage: Stage, force: bool = False):
    """[(partition key or None, [asset keys to run])] for one stage: missing or stale ones, or all."""
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
    return plan


def run_stage(defs: dg.Definitions, instance: dg.DagsterInstance, stage: Stage, *, force: bool = False,
              log=print, log_level: str = "INFO") -> StageReport:
    job = defs.resolve_job_def(stage.job)
    todo = plan_stage(defs, instance, stage, force)
    report = StageReport(stage.job)
    if not todo:
        log(f"== {stage.job}: {', '.join(stage.assets)} up to date")
        return report
    log(f"== {stage.job}: {len(todo)} run(s) for {', '.join(stage.assets)}")
    t0 = time.perf_counter()
    for i, (pk, keys) in enumerate(todo, 1):
        t = time.perf_counter()
        result = job.execute_in_process(instance=instance, partition_key=pk, asset_selection=keys,
                                        run_config=run_config(log_level), raise_on_error=False,
                                        tags=_run_tags())
        if not result.success:
            raise DemoError(f"{stage.job} {pk or ''} failed (run {result.run_id}):\n{_failure_text(result)}")
        log(f"   [{i}/{len(todo)}] {stage.job} {pk or ''} ({', '.join(k.to_user_string() for k in keys)}): "
            f"{time.perf_counter() - t:.1f} s")
        report.partitions.append(pk)
    report.runs = len(todo)
    report.seconds = time.perf_counter() - t0
    return report


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
    lines = []
    for event in result.all_events:
        data = event.event_specific_data
        if event.is_step_failure and getattr(data, "error", None) is not None:
            lines.append(f"{event.step_key}: {data.error.message.strip()}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION" and not data.passed:
            lines.append(f"check {data.asset_check_key.name} failed: {data.description}")
    return "\n".join(lines) or "see the run's logs in the UI"


def materialize_graph(defs: dg.Definitions, instance: dg.DagsterInstance, *, force: bool = False,
                      stages=STAGES, log=print, log_level: str = "INFO") -> list[StageReport]:
    """Run every stage in order (each plans against the results of the ones before it)."""
    return [run_stage(defs, instance, s, force=force, log=log, log_level=log_level) for s in stages]


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
    for key in ("report_html", "report_markdown", "report_dir"):
        if key in meta:
            parts.append(f"{key.replace('_', ' ')}: {meta[key]}")
    return "\n".join(p for p in parts if p)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML (default: $MGD3_CONFIG or configs/embedded.yaml)")
    parser.add_argument("--force", action="store_true", help="re-materialize everything, not only what is unsynced")
    args = parser.parse_args(argv)
    if args.config:
        os.environ["MGD3_CONFIG"] = args.config
    os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT))
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)

    from .definitions import build_definitions

    cfg = load_config()
    defs = build_definitions()
    t0 = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        print(f"MGD3 demo: experiment {cfg.name!r}, Dagster instance {os.environ['DAGSTER_HOME']} "
              f"(files in {instance.storage_directory()})", flush=True)
        release_abandoned_runs(instance, log=lambda m: print(m, flush=True))
        try:
            reports = materialize_graph(defs, instance, force=args.force,
                                        log=lambda m: print(m, flush=True))
        except DemoError as e:
            print(f"\nFAILED: {e}", file=sys.stderr)
            return 1
        total = time.perf_counter() - t0
        print("\n== timings")
        for r in reports:
            print(f"   {r.job:<14} {r.runs:>4} run(s) {r.seconds:8.1f} s")
        print(f"   {'total':<14} {sum(r.runs for r in reports):>4} run(s) {total:8.1f} s")
        print("\n== results\n" + results_text(instance))
    return 0


if __name__ == "__main__":
    sys.exit(main())
