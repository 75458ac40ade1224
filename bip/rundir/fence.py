"""Fencing: only the run folder's current owner writes into it, and a trainer that lost the
lease writes nothing after the moment it could know.

A lease (bip/rundir/lease.py) carries a random token and a generation: 1 for the first owner
of a folder, and one more than the lease it took over (and than any start recorded in
config.yaml) for each later one. ``Fence`` is the one door every write of a trainer goes
through (bip/rundir/folder.py's ``RunFolder`` uses it for metrics, checkpoints, the rewind
point, mask/final/result, error files, config.yaml; bip.export for its files):

1. ``check``: re-read ``owner.json``; unless it still holds our token and generation, raise
   ``FencedOut`` naming the new owner (host, pid, generation). This runs before anything is
   written, so a fenced trainer does not even leave a temp file.
2. The data goes to a generation-named temp file (``.<name>.g<N>.<random>.tmp``) outside any lock.
3. The commit (``os.replace``, an append, a removal) runs under the folder's write lock
   (bip/rundir/lock.py) after a second ``check``; a takeover takes the same lock, so no
   takeover falls between that check and the commit. ``result.json`` is committed with
   ``os.link``, which fails if one exists: a published result is never overwritten, even where
   the filesystem has no locks (then the window between check and commit is open; the
   warning says so and docs/runs.md explains it).

Once fenced, a ``Fence`` refuses every later write without touching the disk. The only thing a
fenced trainer still removes is its own temp file of a commit that was refused (its name holds
its generation: it cannot be a newer owner's file).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from bip.config import identity
from bip.errors import BipError
from bip.rundir.diskerror import writing
from bip.rundir import lock
from bip.rundir.atomic import atomic_write
from bip.rundir.lease import describe_owner, generation_of, read_owner


class FencedOut(BipError):
    """Another trainer owns the run folder now: this one stops at once and writes nothing more."""


class Fence:
    """Writes into ``run_dir`` that happen only while its lease is (token, generation).
    ``starts``: the history of config.yaml (to name a newer owner that has released the
    folder already)."""

    def __init__(self, run_dir: Path, token: str, generation: int,
                 starts: Callable[[], list[dict]] = list):
        self.run_dir, self.token, self.generation = Path(run_dir), token, generation
        self.path = self.run_dir / identity.OWNER
        self.starts = starts
        self.out: FencedOut | None = None

    # -- is it still ours ----------------------------------------------------------------------

    def check(self) -> None:
        """Raise FencedOut unless owner.json still holds our token and generation."""
        if self.out is not None:
            raise self.out
        owner = self._read()
        if not (owner and owner.get("token") == self.token and generation_of(owner) == self.generation):
            raise self.fenced(owner)

    def _read(self) -> dict | None:
        for attempt in range(3):  # an NFS hiccup (ESTALE while the heartbeat replaces it) is not a takeover
            owner = read_owner(self.path)
            if owner is not None or not os.path.lexists(self.path):
                return owner
            time.sleep(0.05 * (attempt + 1))
        return None

    def fenced(self, owner: dict | None = None) -> FencedOut:
        """The FencedOut of this trainer (made once: every later write raises the same)."""
        if self.out is None:
            self.out = FencedOut(f"lost the lease of {self.run_dir} to {self._new_owner(owner)} "
                                 f"(this trainer held generation {self.generation}): stopped, "
                                 "writing nothing more")
        return self.out

    def _new_owner(self, owner: dict | None) -> str:
        if owner is not None:
            return describe_owner(owner, generation=True)
        newer = [s for s in self.starts() if generation_of(s) > self.generation]
        if newer:  # it released the folder already (finished or stopped): its start says who
            return describe_owner(newer[-1], generation=True) + ", which has released it since"
        if os.path.lexists(self.path):
            return "an owner whose owner.json is unreadable"
        return "another trainer (its owner.json is gone)"

    @contextmanager
    def owning(self):
        """Run the block under the folder's write lock, only while the folder is ours. Checked
        first without the lock, so a fenced trainer does not even create the lock file."""
        self.check()
        with lock.hold(self.run_dir):
            self.check()
            yield

    # -- the writes ------------------------------------------------------------------------------

    def fenced_out(self) -> FencedOut | None:
        """None while the folder is ours, else the FencedOut (for an error that a takeover may
        have caused, e.g. our temp file removed by the new owner's start)."""
        try:
            self.check()
        except FencedOut as out:
            return out
        return None

    def write(self, name: str, write: Callable, exclusive: bool = False) -> None:
        """Write ``name`` atomically with ``write(file)``; ``exclusive``: never replace an
        existing file (result.json)."""
        self.check()  # not even a temp file once fenced
        try:
            self._write(name, write, exclusive)
        except FencedOut:
            raise
        except Exception:
            out = self.fenced_out()
            if out is not None:  # the takeover made it fail: say that, not what broke
                raise out from None
            raise

    def _write(self, name: str, write: Callable, exclusive: bool) -> None:
        def commit(tmp: str, path: Path) -> None:
            with self.owning():
                if not exclusive:
                    os.replace(tmp, path)
                    return
                if os.path.lexists(path):
                    raise _published(path)
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise _published(path) from None
                except OSError:  # no hard links on this filesystem: the check above stands
                    os.replace(tmp, path)
                    return
                os.unlink(tmp)
        atomic_write(self.run_dir / name, write, commit=commit, tag=f"g{self.generation}")

    def append(self, name: str, text: str) -> None:
        """Append ``text`` to ``name`` (metrics.jsonl). A failed append (a full disk) is cut back
        off, so the file never holds half a line, and is a one-line DiskError naming the file."""
        path = self.run_dir / name
        with writing(path), self.owning():  # a lock file that cannot be made is a disk error too
            size = path.stat().st_size if path.exists() else 0
            try:
                with open(path, "ab") as f:
                    f.write(text.encode())
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:
                try:
                    os.truncate(path, size)
                except OSError:
                    pass  # read-only: a start drops a cut line (bip.rundir.folder.trim_metrics)
                raise

    def remove(self, name: str) -> None:
        with writing(self.run_dir / name), self.owning():
            (self.run_dir / name).unlink(missing_ok=True)

    def rename(self, name: str, new_name: str) -> None:
        with writing(self.run_dir / new_name), self.owning():
            os.replace(self.run_dir / name, self.run_dir / new_name)


def _published(path: Path) -> BipError:
    return BipError(f"{path} exists already: another trainer published this run; this one "
                    "leaves it as it is")
