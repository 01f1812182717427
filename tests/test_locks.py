"""mgd3_core.locks: the one file lock helper (latent store writers, embedded training, the demo)."""

from __future__ import annotations

import os
import socket
import time

import pytest

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
