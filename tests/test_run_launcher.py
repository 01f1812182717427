"""``WarmRunLauncher``: each run in its own process forked from a warm server, which succeeds,
fails, stops on request and sees the code as it is when the run starts (mgd3_assets/run_launcher.py)."""

from __future__ import annotations

import os
import sys
import time
import uuid

import dagster as dg
import pytest
import yaml


from mgd3_assets.run_launcher import PID_TAG, WarmRunLauncher, quicken_daemons_from_yaml

pytestmark = pytest.mark.slow

PROBE = '''
import os
import time

import dagster as dg

MARK = {mark!r}


@dg.op(config_schema={{"sleep": float, "fail": bool, "out": str}})
def work(context):
    with open(context.op_config["out"], "w") as f:
        modules = __import__('sys').modules
        # torch preloaded; the project's code location preloaded by the server, then forgotten by the run
        f.write(f"{{os.getpid()}} {{MARK}} {{'torch' in modules}} {{os.environ['MGD3_FORGOTTEN_PROJECT_MODULES']}} "
                f"{{'mgd3_assets.definitions' in modules}}")
    time.sleep(context.op_config["sleep"])
    if context.op_config["fail"]:
        raise RuntimeError("the probe was asked to fail")


@dg.job(executor_def=dg.in_process_executor)
def probe():
    work()
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("launcher")
    (root / "dagster.yaml").write_text(yaml.safe_dump({
        "storage": {"sqlite": {"base_dir": str(root / "storage")}},
        "run_launcher": {"module": "mgd3_assets.run_launcher", "class": "WarmRunLauncher",
                         "config": {"daemon_interval_seconds": 3}},
        "telemetry": {"enabled": False}}))
    module = f"warm_probe_{uuid.uuid4().hex[:8]}"
    sys.path.insert(0, str(root))

    with dg.DagsterInstance.from_config(str(root)) as instance:
        yield dict(root=root, module=module, instance=instance)
    sys.path.remove(str(root))


def _launch(setup, mark: str, sleep: float = 0.0, fail: bool = False):
    import importlib

    root, instance = setup["root"], setup["instance"]
    (root / f"{setup['module']}.py").write_text(PROBE.format(mark=mark))
    importlib.invalidate_caches()
    sys.modules.pop(setup["module"], None)
    job = importlib.import_module(setup["module"]).probe
    out = root / f"out-{uuid.uuid4().hex[:6]}.txt"
    run = instance.create_run_for_job(
        job_def=job, run_config={"ops": {"work": {"config": {"sleep": sleep, "fail": fail, "out": str(out)}}}},
        job_code_origin=dg.reconstructable(job).get_python_origin())
    instance.launch_run(run.run_id, workspace=None)
    return run.run_id, out


def _wait(instance, run_id: str, timeout: float = 180) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout
    while not (run := instance.get_run_by_id(run_id)).is_finished:
        assert time.monotonic() < deadline, f"run {run_id} not finished after {timeout} s: {run.status}"
        time.sleep(0.2)
    return run


def test_each_run_executes_in_its_own_forked_process_with_the_libraries_already_imported(setup):
    instance = setup["instance"]
    assert isinstance(instance.run_launcher, WarmRunLauncher)
    pids = []
    for _ in range(2):
        run_id, out = _launch(setup, "first")
        run = _wait(instance, run_id)
        assert run.status == dg.DagsterRunStatus.SUCCESS
        pid, mark, torch_loaded, forgotten, project_loaded = out.read_text().split()
        assert pid == run.tags[PID_TAG] and int(pid) != os.getpid()
        assert torch_loaded == "True"  # preloaded by the fork server: the probe never imports torch
        assert int(forgotten) > 20  # the server had imported the project's code location (and its libraries)
        assert project_loaded == "False"  # the run's process forgot those modules: it imports them afresh
        pids.append(pid)
    assert pids[0] != pids[1]


def test_a_run_sees_the_code_as_it_is_when_it_starts(setup):
    run_id, out = _launch(setup, "edited-after-the-server-started")
    assert _wait(setup["instance"], run_id).status == dg.DagsterRunStatus.SUCCESS
    assert out.read_text().split()[1] == "edited-after-the-server-started"


def test_a_failing_run_is_a_failed_run_with_its_error_in_the_log(setup):
    instance = setup["instance"]
    run_id, _ = _launch(setup, "failing", fail=True)
    assert _wait(instance, run_id).status == dg.DagsterRunStatus.FAILURE
    assert any("the probe was asked to fail" in str(e.dagster_event.event_specific_data)
               for e in instance.all_logs(run_id) if e.dagster_event and e.dagster_event.is_step_failure)


def test_terminating_a_run_stops_its_process(setup):
    instance = setup["instance"]
    run_id, out = _launch(setup, "sleeping", sleep=120)
    deadline = time.monotonic() + 120
    while not out.exists():
        assert time.monotonic() < deadline and not instance.get_run_by_id(run_id).is_finished
        time.sleep(0.2)
    started = time.monotonic()
    assert instance.run_launcher.terminate(run_id)
    run = _wait(instance, run_id, timeout=60)
    assert run.status == dg.DagsterRunStatus.CANCELED and time.monotonic() - started < 60
    pid = int(run.tags[PID_TAG])
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # the process exits (the fork server reaps it)
            os.kill(pid, 0)
            time.sleep(0.2)
    assert not instance.run_launcher.terminate(run_id)  # finished: nothing to stop


def test_the_daemon_interval_comes_from_dagster_yaml_before_any_launcher_exists(tmp_path):
    from mgd3_assets.dagster_private import daemon_interval, quicken_daemons
    from mgd3_core.config import PROJECT_ROOT

    before = daemon_interval()
    try:
        quicken_daemons(30)
        assert quicken_daemons_from_yaml(PROJECT_ROOT) == 5 and daemon_interval() == 5  # the repository's yaml
        assert quicken_daemons_from_yaml(PROJECT_ROOT / "deploy") == 5
        (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({"run_launcher": {
            "module": "mgd3_assets.run_launcher", "class": "WarmRunLauncher", "config": {"daemon_interval_seconds": -1}}}))
        with pytest.raises(ValueError, match="daemon_interval_seconds = -1"):
            quicken_daemons_from_yaml(tmp_path)
        (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({"telemetry": {"enabled": False}}))
        assert quicken_daemons_from_yaml(tmp_path) is None and daemon_interval() == 5  # Dagster's launcher: untouched
        with pytest.raises(ValueError, match="daemon_interval_seconds"):
            WarmRunLauncher(daemon_interval_seconds=0)
    finally:
        quicken_daemons(before)
