"""Seeding and the provenance recorded next to every run (code version, software, machine, job)."""
from __future__ import annotations

import os
import platform
import random
import socket
import sys
import time

import numpy as np
import torch

from bip.rundir.origin import own_git_state, slurm_job_id


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch. cuDNN stays enabled; ``deterministic`` (a recorded config
    field) picks deterministic algorithms instead of autotuned ones."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def provenance(accelerator=None) -> dict:
    import accelerate
    cuda = torch.cuda.is_available()
    return {
        **own_git_state(),
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
