"""Failures that say their cause, two demos on one storage root, a read-only or full disk.

The demo tests run ``python -m mgd3_assets.demo`` as a user would (a subprocess on the
tiny config, the instance under ``$MGD3_HOME/dagster``). The disk tests make the storage root
full or read-only (``Disk``): as root on a small tmpfs of its own (the real ENOSPC and EROFS),
otherwise by what a user without root can do (EFBIG, EACCES), which reach the same handling.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from mgd3_assets import demo
from mgd3_core.latents import validate_latent_store
from mgd3_core.storage import demo_lock_file
from tests.dagster_helpers import (
    TinyGraph,
    materialized_partitions,
    tiny_config,
    write_config,
)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


# ``python -m mgd3_assets.demo`` with a file-size limit set once its modules are imported
# (``Disk.full`` without root: a full storage root, not a process that cannot write anything).
_DEMO_UNDER_FSIZE_LIMIT = """
import os, resource, sys
from mgd3_assets import demo
limit = int(os.environ.pop("FSIZE_LIMIT"))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.exit(demo.main(sys.argv[1:]))
"""


def _demo(config: Path, home: Path, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "MGD3_HOME": str(home), "DAGSTER_HOME": str(ROOT), "PYTHONPATH": str(ROOT), **(env or {})}
    env.pop("MGD3_CONFIG", None)
    run = ["-c", _DEMO_UNDER_FSIZE_LIMIT] if "FSIZE_LIMIT" in env else ["-m", "mgd3_assets.demo"]
    return subprocess.Popen([sys.executable, *run, "--config", str(config)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _imagefolder_with_empty_class(root: Path) -> Path:
    """train/ and val/ with classes alpha, beta (4 images each) and delta (no training image)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("alpha", "beta", "delta"):
            d = root / split / name
            d.mkdir(parents=True)
            if name == "delta" and split == "train":
                continue
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _empty_class_config(tmp_path: Path) -> Path:
    data = _imagefolder_with_empty_class(tmp_path / "data")
    raw = tiny_config(dataset={"kind": "imagefolder", "root": str(data), "classes": None, "max_per_class": None})
    return write_config(tmp_path / "cfg.yaml", raw)


# --------------------------------------------------------------------------- root causes
def test_failed_demo_ends_with_the_root_cause(tmp_path):
    rc, out, err = _finish(_demo(_empty_class_config(tmp_path), tmp_path / "home"))
    assert rc == 1, out + err
    last = err.strip().splitlines()[-1]
    assert last == (f"DatasetError: class 'delta' (delta) has no usable image in {tmp_path / 'data/train/delta'}; "
                    "add images or remove the class from dataset.classes"), err[-2000:]
    # The dataset observation lists every class (the content key hashes exactly the listed files),
    # so the class is refused there, before the backbone.
    assert err.strip().splitlines()[-2] == "in step dataset:"


@pytest.mark.parametrize("case", ["bad config", "missing dataset root"])
def test_errors_while_the_definitions_load_print_one_line(tmp_path, case):
    if case == "bad config":
        cfg = write_config(tmp_path / "bad.yaml", {**tiny_config(), "ipc": [0], "sampler": {"steps": 4, "t_stop": 9}})
        expected = re.compile(r"ConfigError: .*bad\.yaml: invalid configuration: ipc: .*>= 1 .*; sampler: .*t_stop = 9")
    else:
        raw = tiny_config(dataset={"kind": "imagefolder", "root": str(tmp_path / "nowhere"), "classes": None,
                                   "max_per_class": None})
        cfg = write_config(tmp_path / "cfg.yaml", raw)
        expected = re.compile(r"DatasetError: .*nowhere/train is not a directory: set dataset\.root")
    rc, out, err = _finish(_demo(cfg, tmp_path / "home"))
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and expected.match(err.strip()), err
    assert not (tmp_path / "home").exists(), "nothing is written before the config is valid"


def test_the_event_log_carries_the_root_cause(tmp_path):
    """What the UI shows for the failed run: the step failure's message and metadata."""
    cfg_path = _empty_class_config(tmp_path)
    from mgd3_assets.definitions import build_definitions

    defs = build_definitions(config_path=str(cfg_path), home=str(tmp_path / "home"))
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        with pytest.raises(demo.DemoError) as err:
            demo.run_stage(defs, instance, demo.stage_of("backbone"), log=lambda m: None, log_level="ERROR")
        cause = f"DatasetError: class 'delta' (delta) has no usable image in {tmp_path / 'data/train/delta'}"
        assert str(err.value).splitlines()[-1].startswith(cause)
        run = instance.get_runs(limit=1)[0]
        failures = [e.dagster_event for e in instance.all_logs(run.run_id)
                    if e.dagster_event is not None and e.dagster_event.is_step_failure]
        assert len(failures) == 1
        data = failures[0].step_failure_data
        assert data.error.cls_name == "Failure" and data.error.message.split(": ", 1)[1].startswith(cause)
        assert data.user_failure_data.description.startswith(cause)
        assert data.user_failure_data.metadata["error"].value == "DatasetError"
        assert "raise DatasetError(" in data.error.cause.to_string()  # the trace is still there, below


# --------------------------------------------------------------------------- two demos at once
def _digests(home: Path, name: str = "tiny") -> dict[str, str]:
    """sha256 of every latent store, modes file and distilled file (PNG, latents, manifest)."""
    out = {}
    for sub in ("latents", f"runs/{name}/modes", f"runs/{name}/distilled"):
        for p in sorted((home / sub).rglob("*")):
            if p.is_file() and not p.name.endswith(".lock"):
                out[str(p.relative_to(home))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_two_demos_on_one_storage_root_compute_one_set_of_outputs(tmp_path, tiny_graph, monkeypatch):
    config, home = tiny_graph.config_path, tmp_path / "home"  # the single run's config
    procs = [_demo(config, home), _demo(config, home)]
    results = [_finish(p) for p in procs]
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    runs = [int(re.search(r"total\s+(\d+) run\(s\)", out).group(1)) for _, out, _ in results]
    waited = [i for i, (_, out, _) in enumerate(results) if "waiting for the demo already running" in out]
    assert len(waited) == 1, [out[:500] for _, out, _ in results]
    second, first = waited[0], 1 - waited[0]
    assert f"(pid {procs[first].pid} on {os.uname().nodename}; lock {demo_lock_file(home)})" in results[second][1]
    # The second demo only re-observes its inputs (each class's files, each method's settings),
    # finds them unchanged and runs nothing else.
    observations = sum(r.runs for r in tiny_graph.stage_reports[:len(demo.INPUT_STAGES)])
    assert runs[second] == observations and runs[first] == sum(r.runs for r in tiny_graph.stage_reports)
    # Bit-identical to one demo alone: same code, same inputs, same machine and thread count.
    assert _digests(home) == _digests(tiny_graph.home) and len(_digests(home)) > 10
    monkeypatch.setenv("MGD3_HOME", str(home))  # the repository's dagster.yaml: the demo's instance
    with dg.DagsterInstance.from_config(str(ROOT)) as instance:
        for key in ("latent_store", "distilled_images"):
            records = instance.fetch_materializations(dg.AssetKey(key), limit=100).records
            parts = [r.partition_key for r in records]
            assert sorted(parts) == sorted(set(parts)), f"{key} materialized more than once: {parts}"


# --------------------------------------------------------------------------- disk and permissions
class Disk:
    """The disk of a storage root at ``path``, made full or read-only for a ``with`` block.

    As root, ``path`` is a tmpfs of ``size`` of its own: ``full()`` fills it with a file (a write
    then fails with ENOSPC) and ``read_only()`` remounts it read-only (EROFS), the conditions
    themselves. A user without root can neither mount nor fill a small file system, so there:

    - ``read_only()`` takes the write permission off ``path`` and everything under it (EACCES;
      root ignores permission bits, hence the mount as root);
    - ``full()`` sets this process's file-size limit to 0 (RLIMIT_FSIZE): writing any byte to any
      regular file fails with EFBIG where a full disk gives ENOSPC, at the same ``write()``. Python
      ignores SIGXFSZ, which would otherwise kill the writer. The code under test must therefore
      write no other file meanwhile (an in-memory instance). ``full(for_demo=True)`` leaves this
      process alone and yields the environment of a demo that sets the limit itself once its
      modules are imported (``_demo``; an import writes a file of its own: joblib's semaphore).

    Either way the error is an ``OSError`` raised by the same call the real condition fails,
    so the handling under test (the message naming the file or the storage root, earlier outputs
    left intact) is the same; ``full_error`` and ``read_only_error`` are the lines to expect."""

    AS_ROOT = os.geteuid() == 0

    def __init__(self, path: Path, size: str):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        if self.AS_ROOT:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           check=True, capture_output=True)
            self.full_error = _os_error_line("OSError", errno.ENOSPC)
            self.read_only_error = _os_error_line("OSError", errno.EROFS)
        else:
            self.full_error = _os_error_line("OSError", errno.EFBIG)
            self.read_only_error = _os_error_line("PermissionError", errno.EACCES)

    @contextlib.contextmanager
    def full(self, for_demo: bool = False):
        """Yields the environment a ``_demo`` started in the block needs."""
        if self.AS_ROOT:
            filler = self.path / "filler"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                with pytest.raises(OSError) as filled:
                    while True:
                        os.write(fd, b"\0" * (1 << 16))
                assert filled.value.errno == errno.ENOSPC, filled.value
            finally:
                os.close(fd)
            try:
                yield {}
            finally:
                filler.unlink()
        elif for_demo:
            yield {"FSIZE_LIMIT": "0"}
        else:
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
            try:
                yield {}
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    @contextlib.contextmanager
    def read_only(self):
        if self.AS_ROOT:
            self._remount("ro")
            try:
                yield
            finally:
                self._remount("rw")
        else:
            modes = {p: p.stat().st_mode for p in (self.path, *self.path.rglob("*")) if not p.is_symlink()}
            for p, mode in modes.items():
                p.chmod(stat.S_IMODE(mode) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
            try:
                yield
            finally:
                for p, mode in modes.items():
                    p.chmod(stat.S_IMODE(mode))

    def _remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True, capture_output=True)

    def close(self) -> None:
        if self.AS_ROOT:  # lazily, so an open file cannot keep it
            subprocess.run(["umount", "-l", str(self.path)], check=False)


def _os_error_line(cls: str, code: int) -> str:
    """How ``exception_line`` starts for an ``OSError`` of ``code``, e.g. "OSError: [Errno 28] No space left on device"."""
    return f"{cls}: [Errno {code}] {os.strerror(code)}"


@pytest.fixture()
def disk():
    """``disk(path, size)``: a ``Disk`` at ``path``; every one is undone at the end."""
    made: list[Disk] = []

    def make(path: Path, size: str = "32m") -> Disk:
        made.append(Disk(path, size))
        return made[-1]

    yield make
    for d in reversed(made):
        d.close()


def _every_file(home: Path) -> dict[str, str]:
    return {str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(home.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@pytest.mark.parametrize("condition", ["read-only", "full"])
def test_unwritable_storage_root_fails_at_the_first_write_in_one_line(tmp_path, disk, condition):
    mnt = disk(tmp_path / "mnt", size="1m")
    home = mnt.path / "home"
    config = write_config(tmp_path / "tiny.yaml", tiny_config())
    if condition == "full":
        home.mkdir()
        with mnt.full(for_demo=True) as env:  # the lock is the demo's first write: its name, with its path
            rc, out, err = _finish(_demo(config, home, env))
        expected = f"{mnt.full_error}: '{demo_lock_file(home)}'"
    else:
        with mnt.read_only():  # the storage root cannot be created
            rc, out, err = _finish(_demo(config, home))
        expected = f"{mnt.read_only_error}: '{home}'"
    assert rc == 2 and err.strip() == expected, err[-2000:]


def test_a_full_or_read_only_disk_mid_graph_names_it_and_keeps_earlier_outputs(tmp_path, disk):
    """The storage root on its own small file system (the instance in memory): the first stages
    succeed, then the disk fills up, then turns read-only: the next stage fails with the OS error
    and a path under the root, every earlier file is unchanged and valid, and once the disk is
    writable again the graph completes."""
    g = TinyGraph(tmp_path / "g", tiny_config())
    g.instance = dg.DagsterInstance.ephemeral()  # writes no file while the disk is full (see Disk)
    home = disk(g.home, size="48m")
    quiet = dict(log=lambda m: None, log_level="ERROR")
    distill = demo.STAGES.index(demo.stage_of("distilled_images"))
    demo.materialize_graph(g.defs, g.instance, stages=demo.STAGES[:distill], **quiet)
    before = _every_file(g.home)
    assert any(k.startswith("latents/") for k in before) and any("/modes/" in k for k in before)

    def fails_naming(error: str) -> None:
        with pytest.raises(demo.DemoError) as failed:
            demo.run_stage(g.defs, g.instance, demo.STAGES[distill], **quiet)
        last = str(failed.value).splitlines()[-1]
        assert last.startswith(error) and str(g.home) in last, last
        after = _every_file(g.home)
        assert {k: after.get(k) for k in before} == before, "an earlier output changed"
        for store in (g.home / "latents").rglob("*.h5"):
            validate_latent_store(store)

    with home.full():
        fails_naming(home.full_error)
    with home.read_only():
        fails_naming(home.read_only_error)

    demo.materialize_graph(g.defs, g.instance, stages=demo.STAGES[distill:], **quiet)
    for asset in ("distilled_images", "students", "evaluation_report"):
        assert materialized_partitions(g.instance, asset), asset
