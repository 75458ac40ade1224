"""The write lock of a run folder: ``.owner.lock``, held for a few system calls at a time.

Fencing (bip/rundir/fence.py) checks that ``owner.json`` is still ours and then commits a file
(a rename, an append). Without a lock a trainer paused between the check and the commit could
still overwrite a newer owner's file. So the check and the commit run under an exclusive
``flock`` of ``.owner.lock``, and so does a takeover (bip/rundir/lease.py): a takeover waits
while an owner is inside a commit, and an owner cannot commit in the middle of a takeover.
What is written (the temp file, often gigabytes) is written before the lock is taken; only the
check and the rename run under it.

- flock, not fcntl record locks: these are per process (another thread closing any descriptor of
  the file drops them). Linux emulates flock with record locks on NFS, so it holds across nodes
  there too; Lustre needs its ``flock`` mount option.
- Where the filesystem has no locks (ENOLCK, ENOSYS, EOPNOTSUPP: Lustre without ``flock``, some
  FUSE mounts) writes go on unlocked, with one warning: the check still runs right before each
  rename, but the window between the two (microseconds) is open.
- The owner removes the file when it releases the lease. A waiter may then hold a lock on a
  removed file, so after locking it checks that the path still names the file it locked, and
  starts again if not.
"""
from __future__ import annotations

import errno
import fcntl
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

NAME = ".owner.lock"
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)
_WARNED: set[str] = set()
# Threads of one process take turns too (flock alone would do it, but one in-process lock also
# lets a test park the process at a moment no thread is inside a commit).
IN_PROCESS = threading.Lock()


class LockTimeout(Exception):
    """The lock was not free within the timeout (its holder is stopped inside a commit)."""


@contextmanager
def hold(run_dir: Path, timeout: float | None = None):
    """Hold the folder's write lock (creating ``.owner.lock`` if needed). Raises LockTimeout
    after ``timeout`` seconds (None: wait as long as it takes)."""
    path = Path(run_dir) / NAME
    deadline = None if timeout is None else time.monotonic() + timeout
    if not IN_PROCESS.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
        raise LockTimeout(str(path))
    try:
        fd = _lock(path, deadline)
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)  # closing the last descriptor drops the flock
    finally:
        IN_PROCESS.release()


def _lock(path: Path, deadline: float | None) -> int | None:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() > deadline:
                        raise LockTimeout(str(path)) from None
                    time.sleep(0.005)
        except OSError as err:
            os.close(fd)
            if err.errno not in _NO_LOCKS:
                raise
            _warn(path, err)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        mine = os.fstat(fd)
        if now is not None and (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
            return fd
        os.close(fd)  # the owner removed (and maybe someone re-created) the file meanwhile


def _warn(path: Path, err: OSError) -> None:
    if str(path.parent) not in _WARNED:
        _WARNED.add(str(path.parent))
        print(f"warning: {path.parent} has no file locks ({os.strerror(err.errno)}): each write "
              "still checks the lease right before it commits, but a trainer paused between the "
              "check and the rename could overwrite a newer owner's file", file=sys.stderr, flush=True)
