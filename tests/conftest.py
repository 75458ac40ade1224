"""Skip tests whose marker names something this machine lacks (markers: setup.cfg)."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess

import pytest


def slurm_cluster_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def pytest_collection_modifyitems(config, items):
    # Files in the order that keeps ``make test``'s workers (pytest-xdist, one file at a time
    # each) busy to the end: the Slurm file first (it mostly waits on its jobs, beside the
    # CPU-bound files), then files with slow tests, then the rest. Tests keep their order
    # inside a file (the Slurm tests build on each other).
    rank: dict = {}
    for item in items:
        mine = 0 if item.get_closest_marker("slurm") else 1 if item.get_closest_marker("slow") else 2
        rank[item.path] = min(rank.get(item.path, 2), mine)
    items.sort(key=lambda item: rank[item.path])
    reasons = {
        "slurm": lambda: None if slurm_cluster_up() else "no Slurm cluster (bash slurm/dev-cluster.sh up)",
        "ffcv": lambda: None if importlib.util.find_spec("ffcv") else "ffcv not installed (make ffcv)",
        "gpu": lambda: None if importlib.import_module("torch").cuda.is_available() else "no CUDA device",
    }
    checked: dict[str, str | None] = {}
    for item in items:
        for name, reason in reasons.items():
            # The marker, not ``name in item.keywords``: keywords also hold the names of the
            # folders above the test (a checkout in a folder named gpu skipped every test).
            if item.get_closest_marker(name) is not None:
                if name not in checked:  # each check once per session
                    checked[name] = reason()
                if checked[name]:
                    item.add_marker(pytest.mark.skip(reason=checked[name]))
