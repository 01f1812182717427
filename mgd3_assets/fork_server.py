"""``python -m mgd3_assets.fork_server``: the warm process ``run_launcher.WarmRunLauncher`` forks runs from.

It imports the heavy third-party libraries once (``warm_imports``, which also imports the project's
modules for the libraries they pull in), says ``ready``, then reads one
request per line on stdin (JSON: ``run_id``, ``instance_ref``), forks a child that executes that
run as ``dagster api execute_run`` would, and answers the child's pid on its reply pipe. The
children write to this process's stderr (the launcher's), never to the reply pipe; they are
reaped by the kernel (SIGCHLD ignored here, restored in each child). It exits when stdin closes
(its launcher's process ended); runs in progress go on.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def forget_project_modules() -> list[str]:
    """Drop every module of the project (``mgd3_core``, ``mgd3_assets``, the packages included, so
    that no package keeps a submodule as an attribute for ``from . import x``), so this process
    imports them again as they are now: an edit takes effect at the next run. The third-party
    libraries they imported stay loaded."""
    names = [n for n in sys.modules if n.split(".")[0] in ("mgd3_core", "mgd3_assets")]
    for name in names:
        del sys.modules[name]
    return names


def _child(request: dict, reply: int) -> None:
    os.close(reply)
    # How many of the server's project modules the run imports afresh (few: the preload failed).
    os.environ["MGD3_FORGOTTEN_PROJECT_MODULES"] = str(len(forget_project_modules()))
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # a run waits for its own subprocesses
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    code = 1
    try:
        from mgd3_assets.dagster_private import execute_launched_run

        code = execute_launched_run(request["instance_ref"], request["run_id"])
    except BaseException as e:  # noqa: BLE001 - reported, then the process ends
        print(f"run {request.get('run_id')}: run worker failed: {e!r}", file=sys.stderr, flush=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    reply = os.dup(1)  # answers go here; fd 1 becomes stderr, so nothing else can write to the pipe
    os.dup2(2, 1)
    from mgd3_assets import warm_imports

    if warm_imports.FAILED:
        print(f"fork server: could not preload {warm_imports.FAILED}; runs import them", file=sys.stderr)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    os.write(reply, b"ready\n")
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request, reply)
        os.write(reply, f"{pid}\n".encode())


if __name__ == "__main__":
    main()
