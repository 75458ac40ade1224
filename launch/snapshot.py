"""Queued jobs run the code they were submitted with: a copy of the packages taken at submission.

``take(root)`` copies ``bip/`` and ``launch/`` of this checkout into ``<root>/_code/<id>/``,
where ``id`` is a hash of every file's path and content (one copy per distinct code state,
shared by all grids under the root; a few hundred KB each). The copy holds ``CODE.json``
(id, git sha, dirty flag), which bip.rundir.provenance reports instead of asking git. Jobs import
from it: its path goes first on PYTHONPATH, and ``python -P`` keeps the job's working directory
(which may be the checkout) off sys.path. A ``git pull`` or an edit after submission therefore
changes nothing for queued or requeued jobs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bip.rundir.origin import CODE_FILE, git_state

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bip", "launch")


def _files(repo: Path) -> list[Path]:
    out = []
    for package in PACKAGES:
        for path in (repo / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
                out.append(path)
    return sorted(out)


def take(root: Path, repo: Path = REPO) -> dict:
    """Snapshot the code under ``root/_code``; returns {id, path, git_sha, git_dirty}."""
    files = _files(repo)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    code_id = digest.hexdigest()[:12]
    state = git_state(repo)
    info = {"id": code_id, "git_sha": state["git_sha"], "git_dirty": state["git_dirty"]}
    target = Path(root) / "_code" / code_id
    if not (target / CODE_FILE).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{code_id}."))
        try:
            for path in files:
                dest = tmp / path.relative_to(repo)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
            (tmp / CODE_FILE).write_text(json.dumps(info, indent=1) + "\n")
            try:
                os.rename(tmp, target)  # atomic; another launcher may have made the same copy
            except OSError:
                if not (target / CODE_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {**info, "path": str(target)}


def python_command() -> list[str]:
    """The interpreter for jobs: ``-P`` (Python >= 3.11) keeps the working directory, maybe the
    live checkout, off sys.path, so imports come from the snapshot on PYTHONPATH."""
    return [sys.executable, "-P"] if sys.version_info >= (3, 11) else [sys.executable]


def job_environment(env: dict, code_path: str | None) -> dict:
    """``env`` with the snapshot (or, without one, this checkout) first on PYTHONPATH."""
    first = code_path or str(REPO)
    parts = [p for p in env.get("PYTHONPATH", "").split(":") if p and p != first]
    return {**env, "PYTHONPATH": ":".join([first] + parts)}
