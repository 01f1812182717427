"""The demo's runner pool (``mgd3_assets.run_pool``): runners do not outlive a killed demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mgd3_core.config import PROJECT_ROOT

pytestmark = pytest.mark.slow  # a spawned runner loads the code (torch, diffusers, dagster)

# Stands in for ``make demo`` on Dask: opens the pool, says which runners it has, then waits
# (as the demo does while runs execute) until it is killed.
DEMO = """
import sys, time
from mgd3_assets.run_pool import RunnerPool
pool = RunnerPool(1).__enter__()
print(" ".join(map(str, pool.pids)), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by whoever adopted it, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_runners_exit_when_the_demo_is_killed_outright():
    runners: list[int] = []
    demo = subprocess.Popen([sys.executable, "-c", DEMO], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        runners = [int(p) for p in demo.stdout.readline().split()]
        assert len(runners) == 1 and runners[0] != demo.pid
        time.sleep(1.0)
        assert _alive(runners[0])  # alive while the demo is: it waits for runs
        demo.send_signal(signal.SIGKILL)  # nothing in the demo can shut the pool down
        demo.wait(timeout=30)
        deadline = time.monotonic() + 30  # the runner polls its parent every 0.5 s
        while _alive(runners[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(runners[0]), f"runner {runners[0]} outlived the killed demo"
    finally:
        if demo.poll() is None:
            demo.kill()
        for pid in filter(_alive, runners):  # the test failed: leave no runner behind
            os.kill(pid, signal.SIGKILL)
