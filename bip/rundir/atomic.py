"""Atomic file writes (no torch import, so light tools like the results index start fast).

Every file a crash could truncate is written to a temporary sibling and renamed over the
target (os.replace is atomic on POSIX): readers see the old file or the new one, never half.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write, commit=os.replace, tag: str = "") -> None:
    """Call ``write(file)`` on a temporary sibling of ``path``, then ``commit(tmp, path)``: rename
    it over ``path`` (a run folder's owner passes its fenced commit, bip/rundir/fence.py, and its
    generation as ``tag``, which goes into the temp file's name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{tag + '.' if tag else ''}",
                               suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600: teammates must read results too
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        commit(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
