"""Runs start in a warm process: torch, diffusers and Dagster are imported once, not per run.

Dagster's default launcher asks the code server to start every run in a new process, which
imports torch, diffusers and Dagster again (about 9 s of CPU here, 10-20 s with a GPU's CUDA
context) before the run's first step. Every run the UI, a backfill, a schedule or the automation
launches pays that, and a run of one stage's classes often computes for less.

``WarmRunLauncher`` (``run_launcher`` in ``dagster.yaml`` and ``deploy/dagster.yaml``) keeps a
fork server (``python -m mgd3_assets.fork_server``) that has imported those libraries
(``mgd3_assets.warm_imports``), and forks each run's process from it. The run's process then
imports this project's own code and the job afresh, as Dagster's launcher would, so an edited
config or module takes effect at the next run; only the third-party libraries are shared, never
a loaded backbone or any state. Each run is still its own process, with its own failure,
termination (SIGINT, as Dagster's code server sends) and logs.

The daemon starts the fork server as it starts, in the background (``prestart_in_daemon``), so
its imports are done before the first run is launched; any other process starts it with the
first run it launches. The launch of each run then costs a fork.

``daemon_interval_seconds`` (default 5) also shortens the backfill daemon's wait between
iterations, fixed at 30 s by Dagster: a backfill launches a stage's runs at the first iteration
after their parents finished, so a "Materialize all" of the graph's eight stages waited up to
four minutes between them. The backfill daemon reads that interval once, when it starts, before
any run launcher exists; so the project's storage classes (``instance.py``), which the daemon
loads first, apply the setting from ``$DAGSTER_HOME/dagster.yaml`` (``quicken_daemons_from_yaml``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import dagster as dg

from .dagster_private import (ConfigurableClass, ConfigurableClassData, RunLauncher, instance_ref_json,
                              quicken_daemons, run_worker_health)

PID_TAG = "mgd3/run_worker_pid"
HOST_TAG = "mgd3/run_worker_host"


DEFAULT_DAEMON_INTERVAL_S = 5.0


def quicken_daemons_from_yaml(dagster_home: str | os.PathLike | None = None) -> float | None:
    """Apply ``daemon_interval_seconds`` of the ``WarmRunLauncher`` configured in
    ``<dagster_home>/dagster.yaml`` (default ``$DAGSTER_HOME``), and in the daemon's process start
    the fork server; the interval applied, or None where another launcher is configured."""
    import yaml

    path = Path(dagster_home or os.environ.get("DAGSTER_HOME", ".")) / "dagster.yaml"
    raw = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {}
    launcher = raw.get("run_launcher") or {}
    if launcher.get("module") != __name__ or launcher.get("class") != WarmRunLauncher.__name__:
        return None
    seconds = (launcher.get("config") or {}).get("daemon_interval_seconds", DEFAULT_DAEMON_INTERVAL_S)
    _check_interval(seconds)
    quicken_daemons(seconds)
    if _is_daemon_process():
        prestart_in_daemon()
    return seconds


def _is_daemon_process() -> bool:
    """`dagster-daemon run`, or what `dagster dev` starts: python -m <dagster's daemon package> run."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    return argv0.name == "dagster-daemon" or argv0.parts[-2:] == ("_daemon", "__main__.py")


_PRESTARTED: "ForkServer | None" = None
_PRESTART_DONE = False


def prestart_in_daemon() -> None:
    """Start this process's fork server now, in the background; the first ``WarmRunLauncher``
    created here adopts it (a launch waits until its imports are done). Once per process."""
    global _PRESTARTED, _PRESTART_DONE
    if not _PRESTART_DONE:
        _PRESTART_DONE = True
        _PRESTARTED = ForkServer()
        threading.Thread(target=_PRESTARTED.start_quietly, name="mgd3-fork-server-prestart", daemon=True).start()


def _adopt_prestarted() -> "ForkServer":
    global _PRESTARTED
    server, _PRESTARTED = _PRESTARTED, None
    return server or ForkServer()


def _check_interval(seconds) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
        raise ValueError(f"run_launcher.config.daemon_interval_seconds = {seconds!r}: expected seconds > 0 "
                         "(dagster.yaml)")


class ForkServerError(RuntimeError):
    """The fork server did not start or stopped answering; the message says what it printed."""


class ForkServer:
    """One ``python -m mgd3_assets.fork_server`` process, started at the first request."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _reply(self) -> str:
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait(timeout=30)
            self._proc = None
            raise ForkServerError(f"the run launcher's fork server exited with status {code} (its errors are in "
                                  "the daemon's log, above)")
        return line.strip()

    def _ensure_running(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        # The launcher's own import path, so the server finds this project (and the runs their code)
        # however the launching process found it (an install, PYTHONPATH, a working directory).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen([sys.executable, "-m", "mgd3_assets.fork_server"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        if (answer := self._reply()) != "ready":
            self._proc.kill()
            self._proc = None
            raise ForkServerError(f"the run launcher's fork server answered {answer!r} instead of 'ready'")

    def start_quietly(self) -> None:
        """Start the server ahead of the first run; a failure is reported again at that run's launch."""
        with self._lock:
            try:
                self._ensure_running()
            except (ForkServerError, OSError):
                pass

    def fork_run(self, instance_ref: str, run_id: str) -> int:
        """Start the run's process; its pid."""
        with self._lock:
            self._ensure_running()
            self._proc.stdin.write(json.dumps({"run_id": run_id, "instance_ref": instance_ref}) + "\n")
            self._proc.stdin.flush()
            return int(self._reply())

    def stop(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
                self._proc = None


class WarmRunLauncher(RunLauncher, ConfigurableClass):
    """Launch each run in a process forked from a server that has imported the heavy libraries."""

    def __init__(self, inst_data: ConfigurableClassData | None = None,
                 daemon_interval_seconds: float = DEFAULT_DAEMON_INTERVAL_S):
        self._inst_data = inst_data
        _check_interval(daemon_interval_seconds)
        quicken_daemons(daemon_interval_seconds)
        self._server = _adopt_prestarted()
        super().__init__()

    @property
    def inst_data(self):
        return self._inst_data

    @classmethod
    def config_type(cls):
        return {"daemon_interval_seconds": dg.Field(float, default_value=DEFAULT_DAEMON_INTERVAL_S, is_required=False)}

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data, **config_value)

    def launch_run(self, context) -> None:
        run = context.dagster_run
        pid = self._server.fork_run(instance_ref_json(self._instance), run.run_id)
        self._instance.add_run_tags(run.run_id, {PID_TAG: str(pid), HOST_TAG: socket.gethostname()})
        self._instance.report_engine_event(f"Forked the run's process (pid {pid}) from the warm fork server.",
                                           run, cls=self.__class__)

    def _worker_pid(self, run) -> int | None:
        if run.tags.get(HOST_TAG) != socket.gethostname() or not run.tags.get(PID_TAG, "").isdigit():
            return None
        return int(run.tags[PID_TAG])

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        pid = self._worker_pid(run)
        if pid is None:
            return False
        self._instance.report_run_canceling(run)
        try:
            os.kill(pid, signal.SIGINT)  # Dagster turns it into an interrupt at the next safe point
        except ProcessLookupError:
            return False
        return True

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run):
        pid = self._worker_pid(run)
        if pid is None:
            return run_worker_health(None, "the run's worker was not started on this host")
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return run_worker_health(False, f"the run's worker (pid {pid}) has exited")
        return run_worker_health(True, "")

    def dispose(self) -> None:
        self._server.stop()
