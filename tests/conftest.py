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
