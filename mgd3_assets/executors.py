"""Where a run's steps execute, chosen by configuration (environment), never by editing code.

- ``MGD3_EXECUTOR`` unset or ``in_process``: Dagster's ``in_process_executor`` for every job, so a
  run executes its steps in the run's own process and loads the backbone at most once, whoever
  launched it (``make demo``, the UI, the automation's backfills, the daemon's queue). Dagster's
  default would start a new process per step, each loading the backbone again.
- ``MGD3_EXECUTOR=dask``: dagster-dask's executor. With ``MGD3_DASK_SCHEDULER=tcp://host:port``
  the steps go to that existing scheduler's workers (a local cluster, SLURM / PBS through
  dask-jobqueue, Kubernetes); without it each run starts a local cluster of
  ``MGD3_DASK_WORKERS`` (default 2) single-thread worker processes.

Steps that hold the accelerator (pool ``accelerator``) ask Dask for one unit of the worker
resource ``accelerator`` (``dagster-dask/resource_requirements`` op tag), so they run only on
workers started with ``--resources accelerator=1`` (one per GPU, or per CPU "device" on a
machine without one); every other step (checks, k-means, reports) runs on any worker. Steps
share nothing through Dask memory: each reads and writes the storage root (``MGD3_HOME``),
which must be the same path (a shared filesystem) on every worker.
"""

from __future__ import annotations

import copy
import json
import os

import dagster as dg

from .resources import ACCELERATOR_POOL

EXECUTOR_ENV = "MGD3_EXECUTOR"
SCHEDULER_ENV = "MGD3_DASK_SCHEDULER"
WORKERS_ENV = "MGD3_DASK_WORKERS"
EXECUTORS = ("in_process", "dask")

# The Dask worker resource of the accelerator; a worker owning one device advertises 1.
ACCELERATOR_RESOURCE = "accelerator"
DASK_RESOURCES_TAG = "dagster-dask/resource_requirements"  # dagster_dask.executor's key


class ExecutorConfigError(ValueError):
    """MGD3_EXECUTOR / MGD3_DASK_* hold values this project cannot run with."""


def executor_kind() -> str:
    kind = os.environ.get(EXECUTOR_ENV, "").strip() or "in_process"
    if kind not in EXECUTORS:
        raise ExecutorConfigError(f"{EXECUTOR_ENV}={kind!r}: expected one of {', '.join(EXECUTORS)}")
    return kind


def accelerator_step() -> dict:
    """``@dg.asset`` arguments of a step that holds the accelerator.

    In process: the instance's pool ``accelerator`` (dagster.yaml limits it to one step at a
    time). On Dask: the worker resource instead, and no pool: the Dask executor claims no pool
    slots, and a run whose steps have pools carries a record that dask cannot serialize
    (``RunOpConcurrency`` refuses the iteration dask applies to the run's fields).
    """
    tags = {DASK_RESOURCES_TAG: json.dumps({ACCELERATOR_RESOURCE: 1})}
    return {"op_tags": tags} if uses_dask() else {"pool": ACCELERATOR_POOL, "op_tags": tags}


def build_executor() -> dg.ExecutorDefinition:
    """The executor of every job, from the environment."""
    if executor_kind() == "in_process":
        return dg.in_process_executor
    address = os.environ.get(SCHEDULER_ENV, "").strip()
    if address:
        return run_scoped_dask_executor().configured({"cluster": {"existing": {"address": address}}}, name="dask")
    workers = os.environ.get(WORKERS_ENV, "2")
    if not workers.isdigit() or int(workers) < 1:
        raise ExecutorConfigError(f"{WORKERS_ENV}={workers!r}: expected a positive number of workers")
    local = {"n_workers": int(workers), "threads_per_worker": 1, "processes": True,
             "host": "127.0.0.1", "dashboard_address": None, "resources": {ACCELERATOR_RESOURCE: 1}}
    return run_scoped_dask_executor().configured({"cluster": {"local": local}}, name="dask")


def uses_dask() -> bool:
    return executor_kind() == "dask"


def run_scoped_dask_executor() -> dg.ExecutorDefinition:
    """dagster-dask's executor (same configuration), with Dask task keys unique per run.

    dagster-dask names each task ``<job>.<step>``. Two runs of one job at once on a shared
    scheduler (the run queue starting several partitions of a stage) submit the same key, and
    Dask hands the second run the first run's task: the second run's step never executes, yet
    the run reports success. Naming the tasks ``<job>-<run id>.<step>`` keeps them apart; the
    rest is dagster-dask's own code.

    Dask also walks every list, set and tuple among a task's arguments, and Dagster's keys
    refuse iteration. A run the daemon re-executes (``run_retries``), and its reconstructable
    job, hold their asset selection as a set: the copies handed to Dask carry frozensets
    (which Dask leaves alone) instead.
    """
    from dagster_dask import dask_executor
    from dagster_dask.executor import DaskExecutor

    class RunScopedDaskExecutor(DaskExecutor):
        def execute(self, plan_context, execution_plan):
            # DaskExecutor uses plan_context.job_name only for task keys and cluster names,
            # and dagster_run and reconstructable_job only as arguments of each task.
            cls = type(plan_context)
            scoped = type(f"RunScoped{cls.__name__}", (cls,), {
                "job_name": property(lambda ctx: f"{ctx.dagster_run.job_name}-{ctx.dagster_run.run_id}"),
                "dagster_run": property(lambda ctx: _frozen_selections(cls.dagster_run.fget(ctx))),
                "reconstructable_job": property(lambda ctx: _frozen_selections(cls.reconstructable_job.fget(ctx)))})
            context = copy.copy(plan_context)
            context.__class__ = scoped
            return super().execute(context, execution_plan)

    @dg.executor(name="dask", config_schema=dask_executor.config_schema,
                 requirements=dg.multiple_process_executor_requirements())
    def executor(init_context):
        ((cluster_type, cluster_configuration),) = init_context.executor_config["cluster"].items()
        return RunScopedDaskExecutor(cluster_type, cluster_configuration)

    return executor


def _frozen_selections(record):
    """A run or reconstructable job with its asset and asset check selections as frozensets."""
    fields = {f: frozenset(getattr(record, f)) for f in ("asset_selection", "asset_check_selection")
              if getattr(record, f) is not None and not isinstance(getattr(record, f), frozenset)}
    return record._replace(**fields) if fields else record
