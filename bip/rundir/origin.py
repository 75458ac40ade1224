"""Where a run's code and job come from: the git state of the code (or of the launcher's code
snapshot) and the Slurm job id. Light (no torch): the lease, provenance and the launcher's
snapshot all read it."""
from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

CODE_FILE = "CODE.json"  # written into a code snapshot by launch/snapshot.py
REPO = Path(__file__).resolve().parents[2]  # bip/rundir/origin.py -> the checkout (or snapshot)


def git_state(repo: Path = REPO) -> dict:
    """Commit, dirty flag and code snapshot id of the code in ``repo``: a launcher snapshot says
    so in its CODE.json; a checkout is asked with fixed git arguments."""
    try:
        code = json.loads((repo / CODE_FILE).read_text())
        return {"git_sha": code.get("git_sha"), "git_dirty": code.get("git_dirty"), "code": code.get("id")}
    except (OSError, ValueError, AttributeError):
        pass

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
    try:
        return {"git_sha": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
                "code": None}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None, "code": None}


def slurm_job_id() -> str | None:
    """The Slurm job of this process: ``<array job>_<task>`` for an array task."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


@functools.lru_cache(maxsize=1)
def own_git_state() -> dict:
    """git_state of the code this process runs (asked once: a trainer records it at every start)."""
    return git_state(REPO)
