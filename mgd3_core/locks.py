"""Exclusive file locks between processes: ``flock`` on a lock file that names its holder.

One helper for every lock in the project (a latent store's writer, the embedded
backbone's training, a whole ``make demo`` on one storage root). The holder
writes ``pid <pid> on <host>`` into the lock file, so a process that has to
wait or give up can say who it is waiting for.

``flock`` locks belong to an open file description: the kernel drops them when
the holder exits, however it exits (``kill -9`` included), so a lock is never
left behind by a dead process, and two acquisitions in one process exclude
each other as two processes do. A holder names itself just after it takes the
lock and clears its name just before it lets go, so a waiter that finds the
lock taken but no name yet (the holder is between those two steps) looks again
for up to ``NAME_GRACE_S`` before it reports the holder as "unknown". The lock
file itself is left in place:
removing it would let a third process lock a fresh inode while a second
still holds the old one. On a network file system ``flock`` works only where
the server supports it (NFSv4 does).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

NAME_GRACE_S = 5.0  # how long a waiter looks for the name of a holder that has not written it yet
TIMEOUT_NAME_GRACE_S = 1.0  # the same, past its timeout, for a waiter about to give up


class LockedError(RuntimeError):
    """The lock is held by another process (or another acquisition in this one).

    ``path``: the lock file; ``holder``: what its holder wrote ("pid N on host", or
    "unknown"); ``waited``: seconds waited before giving up.
    """

    def __init__(self, path: Path, holder: str, waited: float):
        self.path, self.holder, self.waited = Path(path), holder, waited
        super().__init__(
            f"{path} is held by another process ({holder})"
            f"{f' for over {waited:g} s' if waited else ''}; wait for it to finish, or stop it first"
        )


def holder_of(fd: int) -> str:
    """What the holder of the lock open as ``fd`` wrote into it ("unknown" when empty)."""
    return os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"


def _is_free(fd: int) -> bool:
    """Take the lock if nobody holds it (True); False when another holder has it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        return False


@contextlib.contextmanager
def file_lock(
    path: Path, timeout: float | None = 0.0, on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the exclusive lock ``path`` (created with its folder if missing).

    timeout: 0 = raise LockedError at once if it is held, None = wait as long as it
    takes, > 0 = wait up to that many seconds, then raise LockedError.
    on_wait: called once with the holder ("pid N on host") when the lock is
    busy and we are about to wait for it (e.g. to tell the user why nothing happens).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        t0 = time.monotonic()
        told = False
        while not _is_free(fd):
            waited = time.monotonic() - t0
            holder = holder_of(fd)
            # A holder that has the lock but has not named itself yet is looked at again
            # (up to NAME_GRACE_S) before it is reported as "unknown".
            named = holder != "unknown" or waited >= NAME_GRACE_S
            if timeout is not None and waited >= timeout and (named or waited >= timeout + TIMEOUT_NAME_GRACE_S):
                raise LockedError(path, holder, timeout) from None
            if on_wait is not None and not told and named:
                on_wait(holder)
                told = True
            time.sleep(0.05)
        name = f"pid {os.getpid()} on {socket.gethostname()}".encode()
        try:
            os.pwrite(fd, name, 0)
            os.ftruncate(fd, len(name))  # after the write: the name is never seen half-cleared
        except OSError as e:  # a full disk: write() knows no path, so name it here
            raise OSError(e.errno, e.strerror, str(path)) from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # still held: a waiter never reads a departed holder's name
    finally:
        os.close(fd)  # closing the descriptor releases the flock
