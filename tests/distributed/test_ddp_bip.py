"""BiP's implicit gradient does not depend on the process count: one step on 2 ranks (gloo), each
with half of a global batch, equals one process on the whole batch, for a BN-free model. Averaging
the score gradients instead (mean of g_r^2 instead of (mean g)^2) fails this by orders of magnitude."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_bip_paper_step_on_two_ranks_equals_one_process(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    worker = str(HERE / "workers" / "ddp_bip_worker.py")
    single = subprocess.run([sys.executable, worker, str(tmp_path / "single.pt"), "single"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", worker, str(tmp_path / "two.pt"), "dist"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "single.pt", weights_only=True)
    b = torch.load(tmp_path / "two.pt", weights_only=True)
    for key in ("score_grad", "scores", "weights", "masks"):
        for i, (x, y) in enumerate(zip(a[key], b[key])):
            assert x.dtype == y.dtype and x.shape == y.shape
            torch.testing.assert_close(y.double(), x.double(), rtol=0, atol=1e-6, msg=f"{key}[{i}]")
