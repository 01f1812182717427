"""mgd3_core.locks: the one file lock helper (latent store writers, embedded training, the demo)."""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time

import pytest

import mgd3_core.locks as locks
from mgd3_core.locks import LockedError, file_lock


def test_a_held_lock_names_its_holder_and_times_out(tmp_path):
    lock = tmp_path / "sub" / "x.lock"
    told = []
    with file_lock(lock):
        me = f"pid {os.getpid()} on {socket.gethostname()}"
        assert lock.read_text() == me
        t0 = time.monotonic()
        with pytest.raises(LockedError) as e:
            with file_lock(lock, timeout=0.3, on_wait=told.append):
                pass
        assert time.monotonic() - t0 >= 0.3
        assert e.value.holder == me and f"({me}) for over 0.3 s" in str(e.value) and str(lock) in str(e.value)
        assert told == [me], "on_wait is called once, with the holder, before waiting"
        with pytest.raises(LockedError, match="held by another process"):
            with file_lock(lock, timeout=0):
                pass
    with file_lock(lock, timeout=0):  # released on exit
        pass


def test_a_waiter_names_a_holder_that_names_itself_late_and_never_a_departed_one(tmp_path):
    """The race CI met: the second demo found the lock taken before its holder had written
    its name, and said "unknown". The waiter looks again until the name appears."""
    lock = tmp_path / "x.lock"
    with file_lock(lock):
        pass
    assert lock.read_text() == "", "a holder clears its name before it lets go"
    fd = os.open(lock, os.O_RDWR)  # another holder: takes the lock, names itself 0.5 s later
    fcntl.flock(fd, fcntl.LOCK_EX)
    threading.Timer(0.5, lambda: os.pwrite(fd, b"pid 4242 on elsewhere", 0)).start()
    threading.Timer(1.0, lambda: os.close(fd)).start()  # ...and lets go at 1 s
    told = []
    t0 = time.monotonic()
    with file_lock(lock, timeout=None, on_wait=told.append):
        assert 0.9 <= time.monotonic() - t0 < 4.0
    assert told == ["pid 4242 on elsewhere"]


def test_a_holder_that_never_names_itself_is_reported_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "NAME_GRACE_S", 0.3)
    lock = tmp_path / "x.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held, nothing written
    try:
        told = []
        with pytest.raises(LockedError) as e:
            with file_lock(lock, timeout=0.6, on_wait=told.append):
                pass
        assert told == ["unknown"] and e.value.holder == "unknown"
    finally:
        os.close(fd)
