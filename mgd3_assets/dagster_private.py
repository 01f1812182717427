"""Every private Dagster API this project uses, behind one module (dagster pinned in pyproject.toml).

Dagster's underscore modules change between releases without notice. Nothing else in
the project imports ``dagster._...``; ``tests/test_dagster_private.py`` checks that each
name here still exists and takes the arguments we pass, so an upgrade that changes
one fails there, by name, before a demo or the UI breaks.

- storage classes subclassed by ``instance.py`` (the instance under the storage root);
- Dagster's own staleness resolver, what the UI's "unsynced" badge shows (``demo.py``);
- the SQLAlchemy engine of dagster-postgres's storages, which ``instance.py`` replaces with one
  that keeps its connection open (``pooled_pg_engine``, ``use_pg_engine``);
- a reconstructable job, a workspace and a job subset selector: what ``dagster job launch``
  uses to submit runs to the instance's queue (``cluster_demo.py``, ``demo.py`` on Dask);
- the provenance tags Dagster writes on a materialization (code version, each input's data
  version and event) and a check evaluation's target, for the per-partition events of a run of
  several partitions (``partition_events.py``);
- the run launcher interface, and the body of ``dagster api execute_run``, which a run's process
  forked by ``run_launcher.WarmRunLauncher`` executes; the daemons' polling interval (``quicken_daemons``).

No heavy imports at module level: the webserver and daemon import ``instance.py``.
"""

from __future__ import annotations

import dagster as dg
from dagster._core.launcher import RunLauncher
from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager
from dagster._core.storage.root import LocalArtifactStorage
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage
from dagster._serdes import ConfigurableClass, ConfigurableClassData

__all__ = [
    "ConfigurableClass",
    "ConfigurableClassData",
    "RunLauncher",
    "execute_launched_run",
    "instance_ref_json",
    "daemon_interval",
    "quicken_daemons",
    "run_worker_health",
    "DagsterSqliteStorage",
    "LocalArtifactStorage",
    "LocalComputeLogManager",
    "is_fresh",
    "job_subset_selector",
    "pg_engine",
    "pooled_pg_engine",
    "provenance_tags",
    "reread_input_versions",
    "check_target",
    "reconstructable_job",
    "stale_status_resolver",
    "use_pg_engine",
    "workspace_process_context",
]


def stale_status_resolver(defs: dg.Definitions, instance: dg.DagsterInstance):
    """Dagster's staleness resolver over ``defs`` as of now (``is_fresh`` asks it)."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._time import get_current_datetime

    graph = defs.resolve_asset_graph()
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=graph)
    return CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)


def is_fresh(resolver, key: dg.AssetKey, partition: str | None) -> bool:
    """Whether an asset partition is materialized and up to date with its code and inputs."""
    from dagster._core.definitions.data_version import StaleStatus

    return resolver.get_status(key, partition) == StaleStatus.FRESH


# ---------------------------------------------------------------- per-partition events
def provenance_tags(data_version: str, code_version: str, inputs: dict) -> dict[str, str]:
    """The tags Dagster writes on a materialization it makes from an output with a user-provided data
    version (``execute_step._build_data_version_tags``): ``inputs`` {parent AssetKey: (data version or
    None, storage id of the event it was read from, or None)}."""
    from dagster._core.definitions.data_version import (CODE_VERSION_TAG, DATA_VERSION_IS_USER_PROVIDED_TAG,
                                                         DATA_VERSION_TAG, DEFAULT_DATA_VERSION, NULL_EVENT_POINTER,
                                                         get_input_data_version_tag, get_input_event_pointer_tag)

    tags = {CODE_VERSION_TAG: code_version}
    for key, (version, storage_id) in inputs.items():
        tags[get_input_data_version_tag(key)] = version or DEFAULT_DATA_VERSION.value
        tags[get_input_event_pointer_tag(key)] = str(storage_id) if storage_id else NULL_EVENT_POINTER
    tags[DATA_VERSION_TAG] = data_version
    tags[DATA_VERSION_IS_USER_PROVIDED_TAG] = "true"
    return tags


def reread_input_versions(context: dg.AssetExecutionContext, keys: list[str]) -> None:
    """Make the step read its inputs' versions again when it records its output's provenance:
    Dagster reads them once, when the step starts, so observations the step itself made of its
    inputs would otherwise be missed (``DataVersionCache.wipe_input_asset_version_info``)."""
    step = context.op_execution_context._step_execution_context  # noqa: SLF001
    for key in keys:
        step.wipe_input_asset_version_info(dg.AssetKey(key))


def check_target(run_id: str, storage_id: int, timestamp: float):
    """The materialization a check evaluation is about (Dagster shows its result next to it)."""
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData)

    return AssetCheckEvaluationTargetMaterializationData(run_id=run_id, storage_id=storage_id, timestamp=timestamp)


# ---------------------------------------------------------------- scale-out (cluster_demo.py, demo.py)
def reconstructable_job(module: str, attribute: str, job_name: str, working_directory: str):
    """A job that other processes (run workers, Dask workers) load from ``module:attribute``."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    repo = ReconstructableRepository.for_module(module, attribute, working_directory=working_directory)
    return repo.get_reconstructable_job(job_name)


def workspace_process_context(instance: dg.DagsterInstance, workspace_yaml: str):
    """A workspace of ``workspace.yaml`` (starts its code servers), as the webserver and daemon use."""
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    return WorkspaceProcessContext(instance, WorkspaceFileTarget([workspace_yaml]))


def job_subset_selector(location_name: str, repository_name: str, job_name: str, asset_selection):
    """Selects ``asset_selection`` of a job in a code location (what ``dagster job launch`` builds),
    without the stand-alone check steps: the assets evaluate their checks per partition."""
    from dagster._core.definitions.selector import JobSubsetSelector

    return JobSubsetSelector(location_name=location_name, repository_name=repository_name, job_name=job_name,
                             op_selection=None, asset_selection=list(asset_selection), asset_check_selection=[])


def pooled_pg_engine(postgres_url: str, max_overflow: int = 20):
    """A SQLAlchemy engine that keeps one connection open (and up to ``max_overflow`` more while
    threads query at once), replacing stale ones (``pool_pre_ping``); dagster-postgres's storages
    connect anew for every query instead. dagster-webserver pools the same way for itself
    (``optimize_for_webserver``)."""
    from sqlalchemy import create_engine

    return create_engine(postgres_url, isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=max_overflow,
                         pool_recycle=3600, pool_pre_ping=True)


def use_pg_engine(storage, engine) -> None:
    """Make a dagster-postgres run, event-log or schedule storage query through ``engine``."""
    storage._engine = engine


def pg_engine(storage):
    """The SQLAlchemy engine a dagster-postgres storage queries through."""
    return storage._engine


def instance_ref_json(instance: dg.DagsterInstance) -> str:
    """The instance's reference, serialized for a run's process (as Dagster's launchers pass it)."""
    from dagster._serdes import serialize_value

    return serialize_value(instance.get_ref())


def execute_launched_run(instance_ref: str, run_id: str) -> int:
    """Execute a launched run in this process, as ``dagster api execute_run`` does (the run's job is
    loaded from its code origin; failures are in the event log). Returns the process's exit code."""
    from dagster._cli.api import _execute_run_command_body
    from dagster._core.instance.ref import InstanceRef
    from dagster._serdes import deserialize_value
    from dagster._utils.interrupts import capture_interrupts

    with capture_interrupts(), dg.DagsterInstance.from_ref(deserialize_value(instance_ref, InstanceRef)) as instance:
        return _execute_run_command_body(run_id, instance, lambda _event: None, set_exit_code_on_failure=False)


def run_worker_health(alive: bool | None, message: str):
    """A run launcher's answer to the run monitor: running, failed, or not known here (None)."""
    from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus

    status = WorkerStatus.UNKNOWN if alive is None else WorkerStatus.RUNNING if alive else WorkerStatus.FAILED
    return CheckRunHealthResult(status, message or None)


def quicken_daemons(interval_seconds: float) -> None:
    """Set how long the backfill daemon (and a sensor daemon without its own setting) waits between
    iterations: Dagster fixes it at 30 s (``DEFAULT_DAEMON_INTERVAL_SECONDS``), which each daemon
    reads when its loop starts. A backfill launches a stage's runs at the first iteration after
    their parents finished."""
    from dagster._daemon import controller

    controller.DEFAULT_DAEMON_INTERVAL_SECONDS = interval_seconds


def daemon_interval() -> float:
    """The interval the backfill daemon of this process waits between iterations."""
    from dagster._daemon import controller

    return controller.DEFAULT_DAEMON_INTERVAL_SECONDS
