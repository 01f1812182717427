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
    named, letting_go = threading.Event(), threading.Event()

    def name_itself():
        os.pwrite(fd, b"pid 4242 on elsewhere", 0)
        named.set()

    def let_go():
        named.wait()
        letting_go.set()  # before the close: the waiter cannot get the lock earlier than this
        os.close(fd)

    threading.Timer(0.5, name_itself).start()
    threading.Timer(1.0, let_go).start()  # ...and lets go at 1 s (never before it named itself)
    told = []
    with file_lock(lock, timeout=None, on_wait=told.append):
        assert letting_go.is_set(), "the waiter got the lock while the other holder still had it"
        assert lock.read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
    assert told == ["pid 4242 on elsewhere"], "the late name, not 'unknown' and not the departed holder's"


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
