"""Several runs of one stage at once on a Dask cluster, from long-lived runner processes.

``make demo`` with ``MGD3_EXECUTOR=dask`` executes each planned run (a chunk of a stage's
partitions, ``demo.plan_stage``) with Dagster's ``execute_job`` and the Dask executor. One run at a time keeps one Dask worker busy however many
there are, so the demo hands a stage's runs to a pool of runner processes, ``MGD3_PARALLEL_RUNS``
of them (default: one per Dask worker that has the ``accelerator`` resource). Each runner loads
the code once and then executes run after run; the steps still go to the Dask workers, which
pick them by their resources, and the runs share state only through the storage root and the
instance. The daemon's run queue (``make cluster-demo``, runs from the UI) starts a new process
that loads the code for every run instead; ``bench/orchestration.py`` measures what that costs (docs/scaling-out.md).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from .executors import ACCELERATOR_RESOURCE, SCHEDULER_ENV, ExecutorConfigError, uses_dask

PARALLEL_ENV = "MGD3_PARALLEL_RUNS"


def parallel_runs() -> int:
    """How many runs the demo executes at once: ``MGD3_PARALLEL_RUNS``; else, on an existing Dask
    scheduler, its workers with the ``accelerator`` resource; else 1 (one run at a time)."""
    value = os.environ.get(PARALLEL_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ExecutorConfigError(f"{PARALLEL_ENV}={value!r}: expected a whole number of runs, 1 or more")
        return int(value)
    if not uses_dask() or not os.environ.get(SCHEDULER_ENV):
        return 1
    from distributed import Client

    with Client(os.environ[SCHEDULER_ENV], timeout=30) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return max(1, sum(1 for w in workers if w.get("resources", {}).get(ACCELERATOR_RESOURCE)))


_STATE: dict = {}  # in a runner process: its definitions and instance, made on the first run


def _load_code() -> None:
    import mgd3_assets.definitions  # noqa: F401  (the import is the point: torch, diffusers, dagster)


def _exit_with_parent(parent: int, every: float = 0.5) -> None:
    """Exit this runner once the process that started it is gone. A demo killed outright
    (SIGKILL, OOM killer) cannot shut its pool down, and a runner waiting on the pool's queue
    would otherwise wait for runs forever: the queue's pipe never closes, as every runner holds
    its writing end too. The run a runner is executing stops with it, as a killed demo's would."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(70)

    threading.Thread(target=watch, name="mgd3-runner-parent-watch", daemon=True).start()


def _start_runner(parent: int) -> None:
    _exit_with_parent(parent)
    _load_code()


def _pid(_) -> int:
    time.sleep(0.2)  # long enough that every warm-up call lands in a runner of its own
    return os.getpid()


def _execute(job_name: str, pk: str | None, keys: list[str], config: dict, tags: dict):
    import dagster as dg

    from . import demo
    from .definitions import build_definitions

    if not _STATE:
        _STATE["defs"] = build_definitions()
        _STATE["instance"] = dg.DagsterInstance.get()
    job = _STATE["defs"].resolve_job_def(job_name)
    t = time.perf_counter()
    success, run_id, failure = demo.execute_on_dask(job, _STATE["instance"], pk,
                                                    [dg.AssetKey.from_user_string(k) for k in keys], config, tags)
    return success, run_id, failure, time.perf_counter() - t


class RunnerPool:
    """``size`` runner processes (spawned, so they start clean of this process's threads), each
    with the code loaded before the first run is handed to it; ``pids`` once entered. A runner
    exits by itself when this process dies without shutting the pool down."""

    def __init__(self, size: int):
        self.size = size
        self.pids: list[int] = []
        self._pool = ProcessPoolExecutor(size, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_runner, initargs=(os.getpid(),))

    def __enter__(self) -> "RunnerPool":
        self.pids = sorted(set(self._pool.map(_pid, range(self.size))))
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run_all(self, job_name: str, todo, config: dict, tags: dict, on_done=None) -> list[tuple]:
        """Execute the runs ``todo`` ([(partition key, [asset keys])]) ``size`` at a time; returns
        [(partition key, asset keys, success, run id, failure text, seconds)] in finishing order.
        After a failed run no further run starts; the ones already running finish first."""
        pending = {self._pool.submit(_execute, job_name, pk, [k.to_user_string() for k in keys], config, tags):
                   (pk, keys) for pk, keys in todo}
        done_runs, failed = [], False
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                pk, keys = pending.pop(future)
                if future.cancelled():
                    continue
                result = (pk, keys, *future.result())
                done_runs.append(result)
                if on_done is not None:
                    on_done(result)
                if not result[2] and not failed:
                    failed = True
                    for other in pending:
                        other.cancel()
        return done_runs
