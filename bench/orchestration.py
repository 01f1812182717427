"""What orchestration costs: the embedded graph materialized by ``make demo``, by the UI's
"Materialize all" backfill (webserver + daemon) and on the local cluster, against the sampler alone.

Each launcher starts from an empty storage root and an empty Dagster instance (fresh
``MGD3_HOME`` and ``DAGSTER_HOME`` in a temp dir; the instance's ``dagster.yaml`` is the
repository's plus ``python_logs: managed_python_loggers: [mgd3]``, so the core's "loaded the
<kind> backbone" lines become events of the run that loaded it):

- ``demo``: ``python -m mgd3_assets.demo --profile-json ...`` in a subprocess (one in-process run
  per stage chunk, all in one Python process);
- ``ui``: ``dagster dev`` (webserver + daemon) on a free port of 127.0.0.1, then the GraphQL
  mutation the asset graph's "Materialize all" sends (``launchPartitionBackfill`` with every
  materializable asset and ``allPartitions: true``), polled until the backfill is done. The
  automation sensor and the observation schedules are stopped first (they are on by default and
  would launch runs of their own next to the backfill; any run not from the backfill is reported);
- ``cluster``: ``python -m mgd3_assets.cluster_demo`` (PostgreSQL, a Dask cluster, the daemon's
  run queue); its run records are read before its throw-away PostgreSQL stops.

Per stage, from the instance's run records and event logs: runs, backbone loads, wall time (first
run start to last run end), per run the time queued (creation to PIPELINE_STARTING), the run
process's start (PIPELINE_STARTING to PIPELINE_START: a launched run's worker process starting and
loading the code) and the in-run overhead (PIPELINE_START to the run's end minus its steps'
STEP_START to STEP_SUCCESS), and the distill stage's images/s. The limit: the sampler alone
(``mgd3_core.sampling.sample`` on the launcher's trained backbone, loaded once, measured right after
that launcher) on one distill run's images per diffusion method, the fastest of 3 after a warm-up. Last, the
measured per-run overhead projected to paper scale (ImageNet-1K), with its inputs.

    .venv/bin/python bench/orchestration.py --small --launchers demo,ui          # ~15 min on 2 loaded cores
    .venv/bin/python bench/orchestration.py --small --launchers demo,ui,cluster  # + the local cluster
    .venv/bin/python bench/orchestration.py      # the full embedded graph: ~12 min per launcher, unloaded

A launcher that fails is reported and the others still run (exit status 1).

``--small`` generates a 4-class, short-schedule variant of the config (orchestration cost does
not depend on model quality).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, header, markdown_table, median, set_threads  # noqa: E402

import yaml  # noqa: E402

PY = Path(sys.executable)
BIN = PY.parent
LAUNCHERS = ("demo", "ui", "cluster")
LOAD_MARK = "loaded the "  # mgd3_core.pipeline.get_backbone: "loaded the <kind> backbone <fp> in process <pid>"
BACKFILL_TAG = "dagster/backfill"
REPEATS = 3  # timed sampler calls per method for the limit (after one warm-up); the fastest counts

# Paper-scale projection inputs (stated, not measured here).
PAPER = {
    "classes": 1000, "ipc": 10, "generation_seeds": 3, "diffusion_methods": 3,
    "tflop_per_image": 23.7,  # DiT-XL/2, 50 steps, CFG x2 (bench/RESULTS.md, counted FLOPs)
    "h100_bf16_dense_tflops": 989.0, "utilization": 0.40,
    "gpu_run_extra": "a CUDA context and a 2.7 GB weight load per run (not measured here)",
}


class BenchError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- setup
def small_config(base: dict) -> dict:
    """4 classes, 60 images each, IPC 10, 3 generation seeds, a briefly trained embedded backbone,
    10 sampler steps, students for 2 epochs: the same graph and partition counts per class, minutes
    instead of ~12 min per launcher."""
    raw = copy.deepcopy(base)
    raw["name"] = "orchestration-small"
    raw["dataset"] = {**raw.get("dataset", {}), "classes": ["0", "1", "2", "3"], "max_per_class": 60}
    raw["backbone"] = {**raw.get("backbone", {}), "embedded": {
        "vae": {"steps": 40, "batch_size": 32},
        "dit": {"steps": 60, "batch_size": 32, "warmup_steps": 10},
    }}
    raw["ipc"] = [10]
    raw["sampler"] = {**raw.get("sampler", {}), "steps": 10, "t_stop": 2}
    ev = raw.setdefault("evaluation", {})
    ev["generation_seeds"] = [0, 1, 2]
    ev["training_seeds"] = [0]
    ev["evaluations"] = 1
    ev["tsne_classes"] = 0
    ev["hard"] = {**ev.get("hard", {}), "epochs_by_ipc": {10: 2}, "full_data_epochs": 1}
    return raw


def write_instance_yaml(dagster_home: Path) -> None:
    """The repository's dagster.yaml (instance under $MGD3_HOME/dagster) plus the core's logger."""
    raw = yaml.safe_load((REPO / "dagster.yaml").read_text())
    raw["python_logs"] = {"managed_python_loggers": ["mgd3"], "python_log_level": "INFO"}
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(raw))


def fresh_env(root: Path, config: Path, dagster_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_PG_", "MGD3_"))}
    env.update(MGD3_HOME=str(root / "home"), DAGSTER_HOME=str(dagster_home), MGD3_CONFIG=str(config),
               PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return env


# ----------------------------------------------------------------------------- run statistics
def stage_of_run(run) -> str:
    """The stage (demo.STAGES job name) of a run, from the assets it materializes: a backfill's runs
    are of the implicit asset job, the demo's of the stage jobs; one run of several stages is
    named by all of them joined with '+'."""
    from mgd3_assets import demo

    keys = run.asset_selection or ()
    stages = []
    for k in sorted(keys, key=lambda k: [s.job for s in demo.STAGES].index(demo.stage_of(k.to_user_string()).job)):
        job = demo.stage_of(k.to_user_string()).job
        if job not in stages:
            stages.append(job)
    return "+".join(stages) or run.job_name


def collect_runs(instance) -> list[dict]:
    """One dict per run of ``instance``: its stage, tags, timestamps, step compute and loads."""
    import dagster as dg

    out = []
    for rec in instance.get_run_records():
        run = rec.dagster_run
        events = instance.all_logs(run.run_id)
        ts = defaultdict(list)
        step_start, step_seconds = {}, 0.0
        loads = 0
        for e in events:
            de = e.dagster_event
            if e.user_message and LOAD_MARK in e.user_message and " backbone " in e.user_message and de is None:
                loads += 1
            if de is None:
                continue
            kind = de.event_type_value
            ts[kind].append(e.timestamp)
            if kind == dg.DagsterEventType.STEP_START.value:
                step_start[de.step_key] = e.timestamp
            elif kind in (dg.DagsterEventType.STEP_SUCCESS.value, dg.DagsterEventType.STEP_FAILURE.value) and de.step_key in step_start:
                step_seconds += e.timestamp - step_start.pop(de.step_key)
        E = dg.DagsterEventType
        run_start = min(ts[E.RUN_START.value], default=None)
        run_end = max(ts[E.RUN_SUCCESS.value] + ts[E.RUN_FAILURE.value] + ts[E.RUN_CANCELED.value], default=None)
        out.append({
            "run_id": run.run_id, "job": run.job_name, "stage": stage_of_run(run),
            "status": run.status.value, "backfill": run.tags.get(BACKFILL_TAG),
            "partitions": run.tags.get("dagster/partition")
            or (f"{run.tags.get('dagster/asset_partition_range_start')}..{run.tags.get('dagster/asset_partition_range_end')}"
                if run.tags.get("dagster/asset_partition_range_start") else None),
            # Launched runs (a daemon's): queued from creation to PIPELINE_STARTING (the coordinator
            # hands it to the launcher), a run worker process starting and loading the code from
            # then to PIPELINE_START. In-process runs (make demo) have neither.
            "starting": min(ts[E.RUN_STARTING.value], default=None),
            "created": rec.create_timestamp.timestamp(), "start": rec.start_time or run_start,
            "end": rec.end_time or run_end, "run_start": run_start, "run_end": run_end,
            "step_seconds": step_seconds, "backbone_loads": loads,
            "success": run.status == dg.DagsterRunStatus.SUCCESS,
        })
    return sorted(out, key=lambda r: r["created"])


def phases(r: dict) -> dict:
    """Seconds of one run: queued (created -> PIPELINE_STARTING), process (PIPELINE_STARTING ->
    PIPELINE_START: a run worker starts and loads the code), in_run (PIPELINE_START -> end, minus
    its steps' STEP_START -> STEP_SUCCESS). None where the run has no such events."""
    q = p = None
    if r["starting"] is not None:
        q = r["starting"] - r["created"]
        p = r["run_start"] - r["starting"] if r["run_start"] is not None else None
    i = r["run_end"] - r["run_start"] - r["step_seconds"] if r["run_start"] and r["run_end"] else None
    return {"queued": q, "process": p, "in_run": i}


def stage_summary(runs: list[dict]) -> dict[str, dict]:
    """{stage: runs, loads, wall, overheads} over the runs that materialize assets."""
    by = defaultdict(list)
    for r in runs:
        by[r["stage"]].append(r)
    out = {}
    for stage, rs in by.items():
        done = [r for r in rs if r["start"] and r["end"]]
        wall = (max(r["end"] for r in done) - min(r["start"] for r in done)) if done else float("nan")
        out[stage] = {"runs": len(rs), "failed": sum(not r["success"] for r in rs),
                      "backbone_loads": sum(r["backbone_loads"] for r in rs), "wall": wall,
                      "steps": sum(r["step_seconds"] for r in rs),
                      "queued": [p["queued"] for p in map(phases, rs) if p["queued"] is not None],
                      "process": [p["process"] for p in map(phases, rs) if p["process"] is not None],
                      "overhead_in_run": [p["in_run"] for p in map(phases, rs) if p["in_run"] is not None]}
    return out


def open_instance(dagster_home: Path, mgd3_home: Path):
    """The launcher's instance, read from this process (its storage resolves $MGD3_HOME)."""
    import dagster as dg

    os.environ["MGD3_HOME"] = str(mgd3_home)
    return dg.DagsterInstance.from_config(str(dagster_home))


def count_images(config: Path, home: Path) -> int:
    from mgd3_core import storage
    from mgd3_core.config import load_config

    root = storage.distilled_root(load_config(config), home)
    return sum(1 for _ in root.rglob("*.png")) if root.is_dir() else 0


# ----------------------------------------------------------------------------- launchers
def wait_process(proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        from mgd3_assets.local_cluster import stop_process

        stop_process(proc)
        raise BenchError(f"{what} did not finish within {timeout:.0f} s (--timeout); log {log}:\n{tail(log)}")
    if proc.returncode != 0:
        raise BenchError(f"{what} exited with status {proc.returncode}; log {log}:\n{tail(log)}")


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def launch_demo(root: Path, config: Path, timeout: float) -> dict:
    from mgd3_assets.local_cluster import start_process, stop_process

    dh = root / "dagster_home"
    write_instance_yaml(dh)
    env = fresh_env(root, config, dh)
    profile = root / "demo-profile.json"
    t0 = time.time()
    proc = start_process("demo", [str(PY), "-m", "mgd3_assets.demo", "--config", str(config),
                                  "--profile-json", str(profile)], root, env=env)
    try:
        wait_process(proc, root / "demo.log", "make demo (python -m mgd3_assets.demo)", timeout)
    finally:
        stop_process(proc)
    total = time.time() - t0
    with open_instance(dh, root / "home") as instance:
        runs = collect_runs(instance)
    return {"total_wall": total, "runs": runs, "home": str(root / "home"),
            "images": count_images(config, root / "home"), "profile": json.loads(profile.read_text())}


class GraphQL:
    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/graphql"

    def __call__(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            doc = json.loads(resp.read())
        if doc.get("errors"):
            raise BenchError(f"GraphQL error from {self.url}: {doc['errors']}")
        return doc["data"]


REPOS_QUERY = """{ repositoriesOrError { __typename ... on RepositoryConnection { nodes { name location { name }
  sensors { id name sensorState { status } } schedules { id name scheduleState { status } } } }
  ... on PythonError { message } } }"""
ASSETS_QUERY = "{ assetNodes { assetKey { path } isMaterializable isObservable } }"
LAUNCH = """mutation LaunchPartitionBackfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) { __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on UnauthorizedError { message }
    ... on PartitionSetNotFoundError { message }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { stepKey invalidOutputName } } }"""
BACKFILL_QUERY = """query($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename
  ... on PartitionBackfill { status numCancelable error { message } }
  ... on PythonError { message } } }"""
FINISHED = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}


def launch_ui(root: Path, config: Path, timeout: float) -> dict:
    from mgd3_assets.local_cluster import free_port, start_process, stop_process

    dh = root / "dagster_home"
    write_instance_yaml(dh)
    env = fresh_env(root, config, dh)
    port = free_port()
    gql = GraphQL(port)
    proc = start_process("dagster-dev", [str(BIN / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"),
                                         "-h", "127.0.0.1", "-p", str(port)], root, env=env)
    log = root / "dagster-dev.log"
    try:
        # The webserver answers once the code location is loaded; the daemon starts beside it.
        repo, deadline = None, time.monotonic() + 300
        while repo is None:
            if proc.poll() is not None:
                raise BenchError(f"dagster dev exited with status {proc.returncode}; log {log}:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise BenchError(f"dagster dev on 127.0.0.1:{port} not ready after 300 s; log {log}:\n{tail(log)}")
            try:
                data = gql(REPOS_QUERY, timeout=10)["repositoriesOrError"]
                if data["__typename"] == "RepositoryConnection" and data["nodes"]:
                    repo = data["nodes"][0]
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1)
        for s in repo["sensors"]:
            if s["sensorState"]["status"] == "RUNNING":
                gql("mutation($id: String) { stopSensor(id: $id) { __typename } }", {"id": s["id"]})
        for s in repo["schedules"]:
            if s["scheduleState"]["status"] == "RUNNING":
                gql("mutation($id: String) { stopRunningSchedule(id: $id) { __typename } }", {"id": s["id"]})
        keys = [n["assetKey"] for n in gql(ASSETS_QUERY)["assetNodes"] if n["isMaterializable"]]
        t0 = time.time()
        # What the asset graph's "Materialize all" sends when the selection spans several partitionings.
        res = gql(LAUNCH, {"backfillParams": {"assetSelection": [{"path": k["path"]} for k in keys],
                                              "allPartitions": True, "tags": []}})["launchPartitionBackfill"]
        if res["__typename"] != "LaunchBackfillSuccess":
            raise BenchError(f"launchPartitionBackfill failed: {res}")
        backfill_id, status, deadline = res["backfillId"], "REQUESTED", time.monotonic() + timeout
        while status not in FINISHED:
            if proc.poll() is not None:
                raise BenchError(f"dagster dev exited with status {proc.returncode}; log {log}:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise BenchError(f"backfill {backfill_id} still {status} after {timeout:.0f} s; log {log}:\n{tail(log)}")
            time.sleep(2)
            b = gql(BACKFILL_QUERY, {"id": backfill_id})["partitionBackfillOrError"]
            if b["__typename"] != "PartitionBackfill":
                raise BenchError(f"backfill {backfill_id}: {b}")
            status = b["status"]
        total = time.time() - t0
    finally:
        stop_process(proc)
    if status != "COMPLETED_SUCCESS" and status != "COMPLETED":
        raise BenchError(f"backfill {backfill_id} ended {status}; see {log} (run with --keep to look at the runs)")
    with open_instance(dh, root / "home") as instance:
        runs = collect_runs(instance)
    return {"total_wall": total, "runs": runs, "home": str(root / "home"), "backfill": backfill_id,
            "assets": ["/".join(k["path"]) for k in keys], "images": count_images(config, root / "home"),
            "not_from_backfill": [r["run_id"] for r in runs if r["backfill"] != backfill_id]}


# The cluster demo keeps its instance in a throw-away PostgreSQL: a child process runs it with the
# run records read before that server stops, and with the core's logger captured.
def cluster_child(out: Path, dagster_home: Path, argv: list[str]) -> int:
    import dagster as dg

    from mgd3_assets import cluster_demo

    cluster_demo.DEPLOY = dagster_home  # read by local_deployment when it sets DAGSTER_HOME
    original = cluster_demo._materialize

    def materialize(cluster, logs):
        report = original(cluster, logs)
        with dg.DagsterInstance.get() as instance:
            out.write_text(json.dumps(collect_runs(instance)))
        return report

    cluster_demo._materialize = materialize
    return cluster_demo.main(argv)


def launch_cluster(root: Path, config: Path, timeout: float) -> dict:
    from mgd3_assets.local_cluster import start_process, stop_process

    dh = root / "dagster_home"
    dh.mkdir(parents=True)
    raw = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    raw["python_logs"] = {"managed_python_loggers": ["mgd3"], "python_log_level": "INFO"}
    (dh / "dagster.yaml").write_text(yaml.safe_dump(raw))
    env = fresh_env(root, config, dh)
    out = root / "cluster-runs.json"
    t0 = time.time()
    proc = start_process("cluster-demo", [str(PY), str(Path(__file__).resolve()), "--_cluster-child", str(out),
                                          str(dh), "--config", str(config)], root, env=env)
    try:
        wait_process(proc, root / "cluster-demo.log", "python -m mgd3_assets.cluster_demo", timeout)
    finally:
        stop_process(proc)
        # Its service logs go to a temp dir of its own ("logs in DIR"): moved under this root.
        logs = re.search(r"logs in (/\S+)", tail(root / "cluster-demo.log", 10_000))
        if logs and Path(logs.group(1)).is_dir():
            shutil.move(logs.group(1), root / "cluster-logs")
    return {"total_wall": time.time() - t0, "runs": json.loads(out.read_text()), "home": str(root / "home"),
            "images": count_images(config, root / "home")}


# ----------------------------------------------------------------------------- the limit
def sampler_limit(config: Path, home: Path, threads: int) -> dict:
    """The sampler alone at the pipeline's batch size on one distill run's images per diffusion
    method (classes_per_run classes x IPC x generation seeds), after one warm-up."""
    import torch

    from mgd3_core.config import DIFFUSION_METHODS, load_config
    from mgd3_core.pipeline import class_infos, get_backbone
    from mgd3_core.sampling import SamplerSettings, sample

    cfg = load_config(config)
    bb = get_backbone(cfg, home)
    classes = min(cfg.classes_per_run(), len(class_infos(cfg)))  # `dataset.classes` may be None: every class
    n = classes * cfg.images_per_class()
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(classes).repeat_interleave(cfg.images_per_class()) % bb.num_classes
    modes = torch.randn((n, *bb.latent_shape), generator=g)
    seeds = list(range(n))
    methods = [m for m in cfg.methods if cfg.kind_of(m) in DIFFUSION_METHODS]  # variants by their kind
    per = {}
    for m in methods:
        settings = SamplerSettings.from_config(cfg.sampler_for(m))
        sample(bb, labels[: cfg.sampler.batch_size], seeds[: cfg.sampler.batch_size],
               modes=modes[: cfg.sampler.batch_size], settings=settings, batch_size=cfg.sampler.batch_size)  # warm-up
        times = []
        for _ in range(REPEATS):  # the best of a few: other processes' load only ever slows it down
            t = time.perf_counter()
            sample(bb, labels, seeds, modes=modes, settings=settings, batch_size=cfg.sampler.batch_size)
            times.append(time.perf_counter() - t)
        per[m] = min(times)
    seconds = sum(per.values())
    return {"images_per_method": n, "classes": classes, "batch_size": cfg.sampler.batch_size,
            "methods": per, "seconds": seconds, "images_per_s": n * len(methods) / seconds, "threads": threads,
            "all_methods": len(cfg.methods)}


# ----------------------------------------------------------------------------- projection
def paper_k() -> tuple[int, int]:
    """(classes per run, sampler batch) of the paper-scale config at IPC 10 x 3 generation seeds,
    by the pipeline's own rule (ExperimentConfig.classes_per_run)."""
    from mgd3_core.config import config_from_dict

    raw = yaml.safe_load((REPO / "configs" / "imagenette-dit-xl.yaml").read_text())
    raw["ipc"] = [PAPER["ipc"]]
    raw.setdefault("evaluation", {})["generation_seeds"] = list(range(PAPER["generation_seeds"]))
    raw.pop("runs", None)
    cfg = config_from_dict(raw)
    assert cfg.images_per_class() == PAPER["ipc"] * PAPER["generation_seeds"]
    return cfg.classes_per_run(), cfg.sampler.batch_size


def projection(overhead_s: float, source: str, inputs: bool = True) -> str:
    k, batch = paper_k()
    c, m = PAPER["classes"], PAPER["diffusion_methods"]
    per_class = PAPER["ipc"] * PAPER["generation_seeds"]
    distill_parts, em_parts = c * m, 2 * c
    batched = {"encode": math.ceil(c / k), "modes": math.ceil(c / (2 * k)), "distill": m * math.ceil(c / k)}
    single = {"encode": c, "modes": c, "distill": distill_parts}
    gpu_s = distill_parts * per_class * PAPER["tflop_per_image"] / (PAPER["utilization"] * PAPER["h100_bf16_dense_tflops"])
    rows = []
    for name, runs in (("one run per partition", single), (f"K = {k} classes per run (modes 2K)", batched)):
        n = sum(runs.values())
        ov = n * overhead_s
        rows.append([name, f"{runs['encode']} / {runs['modes']} / {runs['distill']}", n, f"{ov / 3600:.2f} h",
                     f"{gpu_s / 3600:.2f} h", f"{100 * ov / gpu_s:.1f} %"])
    table = markdown_table(["grouping", "encode / modes / distill runs", "runs", "orchestration overhead",
                            "distill GPU compute", "overhead / compute"], rows)
    text = (f"inputs: ImageNet-1K, IPC {PAPER['ipc']}, {PAPER['generation_seeds']} generation seeds, "
            f"{m} diffusion methods -> {distill_parts} distill partitions, {em_parts} encode/mode partitions; "
            f"K = {k} from configs/imagenette-dit-xl.yaml (sampler.batch_size {batch}, {per_class} images per class, "
            f"classes_per_run 'auto' = ceil(4 x batch / images per class)); GPU work at the FLOP bound: "
            f"{per_class} images x {PAPER['tflop_per_image']} TFLOP per partition (DiT-XL/2, 50 steps, CFG x2) "
            f"at {PAPER['utilization']:.0%} of an H100's {PAPER['h100_bf16_dense_tflops']:.0f} TFLOP/s bf16 dense "
            f"= {gpu_s:.0f} s. Not included: on a GPU node each run also pays {PAPER['gpu_run_extra']}: "
            f"multiply it by the runs column.\n\n" if inputs else "")
    return f"{text}per-run overhead {overhead_s:.2f} s ({source}):\n{table}\n"


# ----------------------------------------------------------------------------- main
def fmt(x: float, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_cluster-child"]:  # internal: see cluster_child
        return cluster_child(Path(argv[1]), Path(argv[2]), argv[3:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/embedded.yaml", help="experiment YAML (default configs/embedded.yaml)")
    p.add_argument("--small", action="store_true", help="a 4-class, short-schedule variant of --config (minutes)")
    p.add_argument("--launchers", default="demo,ui", help=f"comma-separated, of {','.join(LAUNCHERS)} (default demo,ui)")
    p.add_argument("--keep", action="store_true", help="keep the temp storage roots and logs")
    p.add_argument("--json", type=Path, help="also write every measurement here")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per launcher before giving up (default 3600)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the sampler limit (default: all cores)")
    args = p.parse_args(argv)
    launchers = [x.strip() for x in args.launchers.split(",") if x.strip()]
    bad = [x for x in launchers if x not in LAUNCHERS]
    if bad or not launchers:
        p.error(f"--launchers: unknown {bad or '(none)'}; choose from {','.join(LAUNCHERS)}")
    config = Path(args.config) if Path(args.config).is_absolute() else REPO / args.config
    if not config.is_file():
        p.error(f"--config {config} does not exist")
    threads = set_threads(args.threads)
    print(header(threads, extra=f"launchers {','.join(launchers)}"), flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="mgd3-orchestration-"))
    results: dict = {"launchers": {}}
    failed: dict[str, str] = {}
    try:
        raw = yaml.safe_load(config.read_text()) or {}
        if args.small:
            raw = small_config(raw)
        from mgd3_core import pipeline
        from mgd3_core.config import config_from_dict

        cfg = config_from_dict(raw)  # a bad config fails here, with the core's message
        cfg_path = tmp / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(raw))
        print(f"config {config.relative_to(REPO) if config.is_relative_to(REPO) else config}"
              f"{' --small' if args.small else ''}: {len(pipeline.class_infos(cfg))} classes, "
              f"{cfg.images_per_class()} images per class per method, {len(cfg.methods)} methods, "
              f"classes_per_run {cfg.classes_per_run()}, sampler batch {cfg.sampler.batch_size}, "
              f"{cfg.sampler.steps} steps; temp root {tmp}", flush=True)
        fns = {"demo": launch_demo, "ui": launch_ui, "cluster": launch_cluster}
        for name in launchers:
            root = tmp / name
            root.mkdir()
            print(f"== {name}: materializing the graph from an empty storage root ...", flush=True)
            t = time.time()
            try:
                results["launchers"][name] = fns[name](root, cfg_path, args.timeout)
            except BenchError as e:  # the other launchers still run; the exit status says it failed
                failed[name] = str(e)
                print(f"FAILED: {name}: {e}", file=sys.stderr, flush=True)
                continue
            print(f"   {name}: {time.time() - t:.0f} s, {len(results['launchers'][name]['runs'])} runs; "
                  f"the limit: the sampler alone on its trained backbone ...", flush=True)
            # Right after each launcher, on its storage root: the machine's load then is the launcher's.
            results["launchers"][name]["limit"] = sampler_limit(cfg_path, Path(results["launchers"][name]["home"]),
                                                                threads)
        results["failed"] = failed
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
        if not results["launchers"]:
            raise BenchError("every launcher failed: " + "; ".join(failed))
        print()
        print(report(results, cfg))
        if failed:
            print(f"\nFAILED launcher(s): {', '.join(failed)} (see above)")
            return 1
    except BenchError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(results: dict, cfg) -> str:
    from mgd3_assets import demo
    from mgd3_assets.jobs import DISTILL_JOB

    order = [s.job for s in demo.STAGES]
    rows, summaries = [], {}
    for name, res in results["launchers"].items():
        summaries[name] = s = stage_summary(res["runs"])
        key = lambda st: (min((order.index(j) for j in st.split("+") if j in order), default=99), st)
        for stage in sorted(s, key=key):
            v = s[stage]
            ips = fmt(res["images"] / v["wall"], 2) if stage == DISTILL_JOB and v["wall"] > 0 else ""
            med = lambda xs: fmt(median(xs), 2) if xs else "-"
            rows.append([name, stage, v["runs"] if not v["failed"] else f"{v['runs']} ({v['failed']} failed)",
                         v["backbone_loads"], fmt(v["wall"]), fmt(v["steps"]), med(v["queued"]), med(v["process"]),
                         med(v["overhead_in_run"]), ips])
        rows.append([name, "**total**", len(res["runs"]), sum(r["backbone_loads"] for r in res["runs"]),
                     fmt(res["total_wall"]), fmt(sum(r["step_seconds"] for r in res["runs"])), "", "", "",
                     f"{res['images']} images"])
    limits = {name: res["limit"] for name, res in results["launchers"].items()}
    lim = next(iter(limits.values()))
    out = [markdown_table(["launcher", "stage (job)", "runs", "backbone loads", "wall s", "step compute s",
                           "queued s/run", "run process start s/run", "in-run overhead s/run", "distill images/s"],
                          rows)]
    out.append("")
    out.append("wall: first run start to last run end of the stage (run records); total: the demo subprocess "
               "(start to exit) / the backfill (launch mutation to done) / the cluster demo subprocess. "
               "Per run, medians over the stage's runs: queued = created -> PIPELINE_STARTING (run queue, "
               "max_concurrent_runs), run process start = PIPELINE_STARTING -> PIPELINE_START (a run worker "
               "process starts and loads the code; none in make demo: its runs share its process), in-run "
               "overhead = PIPELINE_START -> run end minus the steps' STEP_START -> STEP_SUCCESS.")
    out.append(f"sampler alone (the limit), measured right after each launcher on its backbone: "
               f"{lim['images_per_method']} images per method ({lim['classes']} classes x {cfg.images_per_class()}), "
               f"batch {lim['batch_size']}, {lim['threads']} torch threads, the fastest of {REPEATS} after one warm-up "
               f"per method:")
    for name, li in limits.items():
        out.append(f"  after {name}: " + ", ".join(f"{m} {s:.2f} s" for m, s in li["methods"].items())
                   + f" = {li['images_per_s']:.2f} images/s over the diffusion methods")
    for name, res in results["launchers"].items():
        if res.get("not_from_backfill"):
            out.append(f"{name}: {len(res['not_from_backfill'])} run(s) not launched by the backfill "
                       f"(counted above): {res['not_from_backfill'][:5]}")
    launchers = results["launchers"]
    ratios = []
    if "ui" in launchers and "demo" in launchers:
        ratios.append(f"UI wall / demo wall: {launchers['ui']['total_wall'] / launchers['demo']['total_wall']:.2f} "
                      f"({launchers['ui']['total_wall']:.0f} s / {launchers['demo']['total_wall']:.0f} s)")
    for name in launchers:
        s = summaries[name].get(DISTILL_JOB)
        if s and s["wall"] > 0:
            ips, li = launchers[name]["images"] / s["wall"], limits[name]
            sampled = launchers[name]["images"] * len(li["methods"]) / li["all_methods"]  # the diffusion methods'
            ratios.append(f"distill images/s {name} / sampler limit: {ips / li['images_per_s']:.2f} "
                          f"({ips:.2f} / {li['images_per_s']:.2f}; the stage also writes the "
                          f"{li['all_methods'] - len(li['methods'])} non-diffusion methods' images and decodes); "
                          f"counting only the {sampled:.0f} sampled images: "
                          f"{sampled / s['wall'] / li['images_per_s']:.2f}")
    out += ratios
    # Projection from the launcher that starts a process per run (as a cluster does), else the demo.
    out += ["", "== paper-scale projection"]
    for src in [n for n in ("ui", "cluster", "demo") if n in launchers]:
        ph = [phases(r) for r in launchers[src]["runs"] if r["success"]]
        in_run = [p["in_run"] for p in ph if p["in_run"] is not None]
        both = [p["in_run"] + (p["process"] or 0.0) for p in ph if p["in_run"] is not None]
        out.append(projection(median(in_run), f"median over {len(in_run)} {src} runs of the in-run overhead"))
        if src != "demo":
            out.append(projection(median(both), f"median over {len(both)} {src} runs of run process start + "
                                                f"in-run overhead", inputs=False))
        break
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
