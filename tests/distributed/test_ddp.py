"""Two CPU processes (gloo) through accelerate: identical weights and masks after every step."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_two_processes_stay_identical(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29531", str(HERE / "workers" / "ddp_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == {"dense", "hydra", "bip", "bip-reference"}
    for name, entry in report.items():
        assert entry["world"] == 2, name
        assert entry["steps"] > 0 and entry["mismatched"] == [], (name, entry)
        # bip/compute.py: every example of the GLOBAL batch (16 per rank), counted without
        # communication (the report is rank 0's: one count per step)
        per_step = {"dense": (1, 1), "hydra": (1, 1), "bip": (2, 2), "bip-reference": (4, 3)}[name]
        steps = entry["steps"]
        assert entry["passes"] == [steps * 32 * per_step[0], steps * 32 * per_step[1]], (name, entry)
        if name != "dense":
            assert abs(entry["kept_fraction"] - 0.2) < 1e-5
