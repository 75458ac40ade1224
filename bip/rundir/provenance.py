"""Seeding and the provenance recorded next to every run (code version, software, machine, job)."""
from __future__ import annotations

import functools
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch. cuDNN stays enabled; ``deterministic`` (a recorded config
    field) picks deterministic algorithms instead of autotuned ones."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


CODE_FILE = "CODE.json"  # written into a code snapshot by launch/snapshot.py


@functools.lru_cache(maxsize=1)
def git_state() -> dict:
    """Commit, dirty flag and code snapshot id of the code bip runs from: a launcher snapshot
    says so in its CODE.json; a checkout is asked with fixed git arguments."""
    repo = Path(__file__).resolve().parent.parent
    try:
        code = json.loads((repo / CODE_FILE).read_text())
        return {"git_sha": code.get("git_sha"), "git_dirty": code.get("git_dirty"), "code": code.get("id")}
    except (OSError, ValueError, AttributeError):
        pass

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        return {"git_sha": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
                "code": None}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None, "code": None}


def slurm_job_id() -> str | None:
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def provenance(accelerator=None) -> dict:
    import accelerate
    cuda = torch.cuda.is_available()
    return {
        **git_state(),
        "python": sys.version.split()[0], "torch": str(torch.__version__),
        "torchvision": _version("torchvision"), "accelerate": str(accelerate.__version__),
        "cuda": str(torch.version.cuda) if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "world_size": accelerator.num_processes if accelerator else 1,
        "host": socket.gethostname(), "slurm_job_id": slurm_job_id(),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _version(module: str) -> str | None:
    try:
        return str(__import__(module).__version__)
    except ImportError:
        return None
