"""A full, read-only or over-quota disk as one line, and the folders a failed start leaves.

Every write into a run folder goes through bip/rundir/atomic.py (or ``writing``), which turns
ENOSPC / EROFS / EDQUOT into a ``DiskError`` naming the file the run was writing: the CLIs print
a BipError as one line, and it stays an OSError for the code that already tolerates a failed
write (error files, the lease's heartbeat). torch.save reports a failed write as ``RuntimeError:
[enforce fail at inline_container.cc] unexpected pos``; atomic.py records the OSError of the
underlying write, so the cause is not lost.

Import stays light (no torch), like atomic.py.
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

from bip.config import identity
from bip.errors import BipError

# errno -> what to do about it (the message ends "..., then run the same command again").
_FIX = {errno.ENOSPC: "free space", errno.EDQUOT: "free space or raise the quota",
        errno.EROFS: "make the file system writable"}


class DiskError(BipError, OSError):
    """A write failed because the disk is full, read-only or over quota (one line)."""


def disk_error(err: BaseException, path: Path) -> DiskError | None:
    """``err`` (or the OSError in its chain) as a DiskError about ``path``, or None if it is
    not a disk-full / read-only / quota error."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, DiskError):
            return err
        if isinstance(err, OSError) and err.errno in _FIX:
            code = err.errno
            message = (f"cannot write {path}: {os.strerror(code)} ({errno.errorcode[code]}); "
                       f"{_FIX[code]}, then run the same command again")
            found = DiskError(message)
            found.errno = code  # str() stays the message (OSError shows errno only with strerror)
            return found
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def writing(path: Path):
    """Report a disk error of the writes in this block as a DiskError about ``path``."""
    try:
        yield
    except OSError as err:
        found = disk_error(err, path)
        if found is None or found is err:
            raise
        raise found from None


def new_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first (what a start
    creates, so that a start that could write nothing removes exactly those)."""
    path, missing = Path(path).absolute(), []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_unstarted(folder, created: list[Path]) -> None:
    """After a failed start: if this call created the run folder and could not even record the
    run (no config.yaml), remove what it wrote there, release the lease, and remove the
    folders it created (only those, and only while empty). ``folder``: bip.rundir.folder.RunFolder."""
    path = Path(folder.path).absolute()
    if path not in created or (path / identity.CONFIG).exists():
        return
    if folder.owned:  # the folder was ours alone: its error and temp files are this call's
        try:
            for name in os.listdir(path):
                if (name.startswith("error.") and name.endswith(".json")) or \
                        (name.startswith(".") and name.endswith(".tmp")):
                    (path / name).unlink(missing_ok=True)
        except OSError:
            return
    folder.release()
    for made in created:  # deepest first; rmdir refuses a folder that someone else wrote into
        try:
            made.rmdir()
        except OSError:
            return
