"""Atomic file writes (no torch import, so light tools like the results index start fast).

Every file a crash could truncate is written to a temporary sibling and renamed over the
target (os.replace is atomic on POSIX): readers see the old file or the new one, never half.
A write that fails removes its temporary file, and a full, read-only or over-quota disk is a
one-line DiskError naming the target (bip/rundir/diskerror.py).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bip.rundir.diskerror import disk_error

_UMASK = os.umask(0)
os.umask(_UMASK)


class _Recording:
    """The temporary file as the writer sees it: every call passes through, and the first
    OSError of a write or flush is kept, because torch.save replaces it with a RuntimeError
    ("unexpected pos") that no longer says the disk is full."""

    def __init__(self, file):
        self._file, self.error = file, None

    def write(self, data):
        return self._kept(self._file.write, data)

    def flush(self):
        return self._kept(self._file.flush)

    def _kept(self, call, *args):
        try:
            return call(*args)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name):
        return getattr(self._file, name)


def atomic_write(path: Path, write, commit=os.replace, tag: str = "") -> None:
    """Call ``write(file)`` on a temporary sibling of ``path``, then ``commit(tmp, path)``: rename
    it over ``path`` (a run folder's owner passes its fenced commit, bip/rundir/fence.py, and its
    generation as ``tag``, which goes into the temp file's name)."""
    path, tmp, recording = Path(path), None, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{tag + '.' if tag else ''}",
                                   suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600: teammates must read results too
        with os.fdopen(fd, "wb") as f:
            recording = _Recording(f)
            write(recording)
            f.flush()
            os.fsync(f.fileno())
        commit(tmp, path)
    except BaseException as err:
        if tmp is not None:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:
                pass  # read-only now: the next start removes it (bip.rundir.folder.claim)
        found = (recording and recording.error and disk_error(recording.error, path)) or disk_error(err, path)
        if found is not None:
            raise found from None
        raise


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
