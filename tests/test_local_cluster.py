"""The local services (``mgd3_assets.local_cluster``) do not outlive a process killed outright.

``make cluster-demo`` and the scale-out tests start PostgreSQL, a Dask scheduler and workers
in sessions of their own; their ``finally`` blocks stop them, but nothing runs after a
SIGKILL. The ``ServiceWatch`` each service holds then stops them and removes their directories.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mgd3_core.config import PROJECT_ROOT

pytestmark = pytest.mark.slow  # PostgreSQL's initdb and a Dask worker's start

# Stands in for ``make cluster-demo``: starts the services, says what it started, waits.
DEPLOYMENT = """
import json, time
from mgd3_assets.local_cluster import DaskCluster, PostgresServer
pg = PostgresServer().__enter__()
cluster = DaskCluster({"w0": {"accelerator": 1}}).__enter__()
print(json.dumps({"groups": [pg.proc.pid, *(p.pid for p in cluster.procs.values())],
                  "workers": list(cluster.worker_pids().values()),
                  "dirs": [str(pg.root), str(cluster.root)], "port": pg.port}), flush=True)
time.sleep(600)
"""


def _members(pgid: int) -> list[int]:
    """Running processes of a process group (zombies, exited but not yet reaped, count as gone)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_services_stop_and_their_directories_go_when_their_starter_is_killed():
    started: dict = {"groups": []}
    proc = subprocess.Popen([sys.executable, "-c", DEPLOYMENT], cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        started = json.loads(proc.stdout.readline())
        assert len(started["groups"]) == 3 and all(_members(g) for g in started["groups"])
        assert started["workers"] and all(Path(d).is_dir() for d in started["dirs"])
        proc.send_signal(signal.SIGKILL)  # no finally, no atexit: only the watches can act
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60  # SIGTERM/SIGINT first, SIGKILL after 20 s
        while time.monotonic() < deadline and (any(_members(g) for g in started["groups"])
                                               or any(Path(d).exists() for d in started["dirs"])):
            time.sleep(0.5)
        left = {g: _members(g) for g in started["groups"] if _members(g)}
        assert not left, f"services outlived the killed process: {left}"
        assert not [d for d in started["dirs"] if Path(d).exists()]
        assert not [pid for pid in started["workers"] if _alive(pid)]  # the nanny's worker process too
    finally:
        if proc.poll() is None:
            proc.kill()
        for pgid in started["groups"]:  # the test failed: leave nothing behind
            if _members(pgid):
                os.killpg(pgid, signal.SIGKILL)


def test_a_stopped_service_leaves_its_watch_nothing_to_do(tmp_path):
    from mgd3_assets.local_cluster import ServiceWatch, start_process, stop_process

    keep = tmp_path / "keep"
    keep.mkdir()
    watch = ServiceWatch()
    sleeper = start_process("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"], tmp_path)
    watch.group(sleeper)
    watch.directory(keep)
    stop_process(sleeper)
    watch.close()  # "done": the watch exits without acting on what it was told
    assert watch.proc.returncode == 0
    assert keep.is_dir()
