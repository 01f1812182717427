"""Scale-out: the distill stage of the embedded demo on 1 vs 2 single-thread Dask workers, and
the Dask executor's per-step scheduling overhead.

The distill stage's inputs (backbone, latent stores, modes) come from a storage root where
``make demo`` or ``make cluster-demo`` ran (``--home``, default ``mgd3_home``); each measurement
copies them into a fresh temporary root, so every measurement starts from the same state. For N
workers: PostgreSQL and a Dask cluster of N workers (1 Dask thread, 1 torch thread, 1
``accelerator`` each). The runs start in one of two ways:

- the daemon's run queue, as ``make cluster-demo``: every ``distilled_images`` run is submitted
  at once and the daemon launches each in a process forked from its warm server (the daemon is
  started, and has launched one run, before the clock);
- ``make demo``'s runner processes (``mgd3_assets/run_pool.py``), one per worker: started and
  warm before the clock, each executes run after run.

The stage time runs from the first submission to the last run's end. Speedup = time(1 worker) /
time(2 workers), each with its own number of runners; and, strictly, with 2 runners on both.

Overhead: a job of K independent no-op steps through the Dask executor on the 2-worker cluster,
vs one of 1 step: (t_K - t_1) / (K - 1) per step; t_1 is one whole run of one no-op step.

    .venv/bin/python bench/scaleout.py                     # the embedded demo's distill stage
    .venv/bin/python bench/scaleout.py --home H --config C # another materialized experiment
    .venv/bin/python bench/scaleout.py --methods mgd3      # only one method's partitions (shorter)
    .venv/bin/python bench/scaleout.py --paths demo        # only the runner processes' rows
    .venv/bin/python bench/scaleout.py --dask-profiler     # workers with Dask's profiler on
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when Dask workers load this file
from _common import REPO, header, markdown_table  # noqa: E402

import dagster as dg  # noqa: E402
from dagster_dask import dask_executor  # noqa: E402

NOOP_STEPS = 16


def _noop_op(i: int):
    @dg.op(name=f"noop_{i}")
    def noop() -> None:
        return None

    return noop


@dg.job(executor_def=dask_executor)
def noop_1():
    _noop_op(0)()


@dg.job(executor_def=dask_executor)
def noop_k():
    for i in range(NOOP_STEPS):
        _noop_op(i)()


def _copy_inputs(src: Path, dst: Path, experiment: str) -> None:
    """What the distill stage reads: backbones, latent stores, the experiment's modes."""
    for rel in ("backbones", "latents", f"runs/{experiment}/modes"):
        if not (src / rel).is_dir():
            raise SystemExit(f"{src / rel} missing: materialize the experiment first (make demo), or pass --home")
        shutil.copytree(src / rel, dst / rel, ignore=shutil.ignore_patterns("*.lock", "*.partial"))


def step_seconds(instance: dg.DagsterInstance, run_ids) -> list[float]:
    """How long each successful step of the runs took on its worker (Dagster's STEP_SUCCESS duration)."""
    return [r.event_log_entry.dagster_event.event_specific_data.duration_ms / 1000
            for run_id in run_ids
            for r in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_SUCCESS).records]


def distill_stage(n_workers: int, src: Path, experiment: str, methods: list[str] | None = None,
                  runners: int = 0) -> tuple[float, int, dict, list[float]]:
    """(seconds, runs, steps per worker, each step's seconds) of the distill stage on ``n_workers``
    workers: every partition, or those of ``methods``. ``runners`` 0: submitted to the daemon's run
    queue (a new run worker process per run); N: executed by N runner processes (``make demo``)."""
    from mgd3_assets import cluster_demo, demo
    from mgd3_assets.definitions import build_definitions
    from mgd3_assets.run_pool import RunnerPool

    home = Path(tempfile.mkdtemp(prefix=f"mgd3-bench-scaleout-{n_workers}w-"))
    logs = home / "logs"
    logs.mkdir()
    os.environ["MGD3_HOME"] = str(home)
    try:
        _copy_inputs(src, home, experiment)
        with cluster_demo.local_deployment(n_workers, 1, logs) as (_, cluster):
            defs = build_definitions()
            stage = next(s for s in demo.STAGES if s.job == demo.DISTILL_JOB)
            job = defs.resolve_job_def(demo.DISTILL_JOB)
            def keep(pk) -> bool:  # a planned run: one partition, or a range of one method's classes
                first = pk.start if isinstance(pk, dg.PartitionKeyRange) else pk
                return methods is None or str(first).split("|")[1] in methods
            with dg.DagsterInstance.get() as instance:
                if runners:
                    with RunnerPool(runners) as pool:  # started and warm before the clock, like the daemon
                        todo = [(pk, k) for pk, k in demo.plan_stage(defs, instance, stage) if keep(pk)]
                        t0 = time.perf_counter()
                        results = pool.run_all(demo.DISTILL_JOB, todo, demo.run_config("WARNING"), {})
                        seconds = time.perf_counter() - t0
                    assert all(r[2] for r in results), [r[4] for r in results if not r[2]]
                    run_ids = [r[3] for r in results]
                else:
                    with cluster_demo.run_queue(instance, logs) as submitter:
                        # Before the clock, one run through the queue (the method settings'
                        # observation): the daemon has loaded the code location and its fork
                        # server, as in a deployment that has been up (make cluster-demo's earlier
                        # stages), rather than doing it inside the measured stage.
                        observe = next(s for s in demo.STAGES if s.job == demo.METHOD_SETTINGS_JOB)
                        cluster_demo.run_stage(defs, instance, submitter, observe, log=lambda m: None)
                        print(f"   {n_workers} worker(s): submitting the stage's runs", flush=True)
                        seconds, run_ids = cluster_demo.run_stage(defs, instance, submitter, stage,
                                                                  log=lambda m: None, keep=keep)
                split = cluster_demo.worker_split(cluster, instance, run_ids)
                steps = step_seconds(instance, run_ids)
        return seconds, len(run_ids), dict(split), steps
    finally:
        shutil.rmtree(home, ignore_errors=True)


def noop_overhead(repeats: int = 3) -> tuple[float, float]:
    """(seconds of a one-no-op-step run, seconds per extra no-op step) through the Dask executor."""
    from mgd3_assets import cluster_demo

    home = Path(tempfile.mkdtemp(prefix="mgd3-bench-noop-"))
    os.environ["MGD3_HOME"] = str(home)
    try:
        with cluster_demo.local_deployment(2, 1, home) as (_, cluster):
            executor = {"execution": {"config": {"cluster": {"existing": {"address": cluster.address}}}}}
            times = {}
            with dg.DagsterInstance.get() as instance:
                for name in ("noop_1", "noop_k"):
                    recon = dg.reconstructable(globals()[name])
                    samples = []
                    for _ in range(repeats + 1):  # the first run warms the workers' imports
                        t = time.perf_counter()
                        with dg.execute_job(recon, instance, run_config=executor) as result:
                            assert result.success, f"{name} failed"
                        samples.append(time.perf_counter() - t)
                    times[name] = statistics.median(samples[1:])
        return times["noop_1"], (times["noop_k"] - times["noop_1"]) / (NOOP_STEPS - 1)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=REPO / "mgd3_home", help="a materialized storage root")
    parser.add_argument("--config", help="its experiment YAML (default: $MGD3_CONFIG or configs/embedded.yaml)")
    parser.add_argument("--methods", type=lambda v: v.split(","), default=None,
                        help="only these methods' partitions, e.g. mgd3 (default: the whole stage)")
    parser.add_argument("--paths", type=lambda v: v.split(","), default=["daemon", "demo"],
                        help="how runs start: daemon (the run queue), demo (runner processes); default both")
    parser.add_argument("--classes-per-run", type=int, default=None,
                        help="runs.classes_per_run for the measurement (default: the config's; the "
                        "embedded graph's 'auto' puts a method's 10 classes in one run, which one worker executes)")
    parser.add_argument("--dask-profiler", action="store_true",
                        help="workers with Dask's statistical profiler on (the local clusters turn it off)")
    args = parser.parse_args()
    if args.dask_profiler:
        os.environ["DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"] = "True"  # over the clusters' config file
    if args.config:
        os.environ["MGD3_CONFIG"] = str(Path(args.config).resolve())
    from mgd3_core.config import load_config

    cfg = load_config()
    if args.classes_per_run:
        import yaml

        raw = yaml.safe_load(Path(os.environ.get("MGD3_CONFIG") or REPO / "configs/embedded.yaml").read_text())
        raw["runs"] = {"classes_per_run": args.classes_per_run}
        grouped = Path(tempfile.mkdtemp(prefix="mgd3-bench-scaleout-cfg-")) / f"{cfg.name}.yaml"
        grouped.write_text(yaml.safe_dump(raw))
        os.environ["MGD3_CONFIG"] = str(grouped)
        cfg = load_config()
    print(header(1, extra=f"experiment {cfg.name}, inputs from {args.home}"
                 + (", Dask profiler on" if args.dask_profiler else "")), flush=True)
    rows, seconds = [], {}
    # (how runs start, workers, runner processes): the daemon's queue as make cluster-demo, and
    # make demo's runner processes (one per worker; and 2 runners on 1 worker, which overlaps one
    # run's Dagster work with the other's step, for the strict comparison).
    plan = [("daemon queue", 1, 0), ("daemon queue", 2, 0), ("demo runners", 1, 1), ("demo runners", 2, 2),
            ("demo runners", 1, 2)]
    plan = [p for p in plan if p[0].split()[0] in args.paths]
    for path, n, runners in plan:
        load0 = os.getloadavg()[0]
        s, runs, split, steps = distill_stage(n, args.home.resolve(), cfg.name, args.methods, runners)
        seconds[path, n, runners] = s
        base = seconds.get((path, 1, runners if n == 1 else 1 if runners else 0), float("nan"))
        # The steps' own time (on the workers) against the stage's: the rest is Dagster's per-run
        # work (queueing, launching a run worker process, loading the code, events) around them.
        rows.append([path, n, runners or "-", runs, f"{s:.1f}", f"{base / s:.2f}x", f"{sum(steps):.1f}",
                     f"{statistics.median(steps):.2f}" if steps else "-", f"{100 * sum(steps) / (n * s):.0f} %",
                     ", ".join(f"{w}: {k}" for w, k in sorted(split.items())),
                     f"{load0:.1f} -> {os.getloadavg()[0]:.1f}"])
        print(f"{path}, {n} worker(s), {runners or '-'} runner(s): {s:.1f} s", flush=True)
    print(markdown_table(["runs start from", "workers", "runners", "runs", "distill stage (s)",
                          "speedup vs 1 worker", "steps' time on workers (s)", "median step (s)", "workers busy",
                          "steps per worker", "load avg"], rows))
    if ("demo runners", 1, 2) in seconds:
        print(f"demo runners, 2 workers against 1 worker with 2 runners each: "
              f"{seconds['demo runners', 1, 2] / seconds['demo runners', 2, 2]:.2f}x")
    one, per_step = noop_overhead()
    print(f"\nno-op step through the Dask executor (2 workers): one run of 1 step {one:.2f} s; "
          f"each further step {per_step * 1000:.0f} ms ({NOOP_STEPS} vs 1 steps, median of 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
