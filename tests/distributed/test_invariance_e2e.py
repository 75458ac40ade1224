"""End to end: the same `python -m bip.train` command on 1 process with batch B and on 2 (torchrun,
gloo) with B/2 ends with the same result.json metrics, metrics.jsonl and final weights, for a
BN-free arch (vgg11), through the torch DataLoader (pretrain) and the tensor loader (BiP).
The per-step harness for every method is tests/test_invariance.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
E2E = ["--arch", "vgg11", "--dataset", "synthetic", "data.synthetic_size=160", "--epochs", "1",
       "train.steps_per_epoch=3"]


def train_both(root: Path, args: list[str], port: int) -> tuple[Path, Path]:
    """Run folders of (1 process, batch 16) and (torchrun 2 processes, batch 8), run side by side."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    one = [sys.executable, "-m", "bip.train", *E2E, *args, "--batch-size", "16", "--result-dir", str(root)]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "bip.train", *E2E, *args, "--batch-size", "8", "--result-dir", str(root)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for cmd in (one, two)]
    folders = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        folders.append(Path(out.strip().splitlines()[-1]))
    return folders[0], folders[1]


def assert_same_run(one: Path, two: Path) -> None:
    a, b = (json.loads((p / "result.json").read_text()) for p in (one, two))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert a["global_batch_size"] == b["global_batch_size"] == 16
    assert a["run_id"] != b["run_id"]  # another world size is another run folder
    differ = {k for k in a if a[k] != b[k] and not k.endswith("wall_time_s")} - {"run_id", "world_size", "parent_id"}
    assert {k for k in differ if not isinstance(a[k], float)} == set(), differ
    for k in differ:
        assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])), (k, a[k], b[k])
    for p, world in ((one, 1), (two, 2)):
        doc = json.loads((p / "config.yaml").read_text())
        assert (doc["world_size"], doc["global_batch_size"]) == (world, 16)
        assert ("train.world_size" in doc["hashed"]) == (world > 1)  # 1-process ids unchanged
    ma, mb = ([json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()] for p in (one, two))
    for row_a, row_b in zip(ma, mb):  # train_loss / train_acc are every rank's, not rank 0's shard
        for k in ("train_loss", "train_acc", "val_acc", "test_acc", "val_loss", "test_loss"):
            assert abs(row_a[k] - row_b[k]) <= 1e-5 * max(1.0, abs(row_a[k])), k
    fa, fb = (torch.load(p / "final.pt", weights_only=True)["model"] for p in (one, two))
    assert fa.keys() == fb.keys()
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], rtol=0, atol=1e-5, msg=k)


def test_the_same_command_on_two_processes_with_half_the_batch_gives_the_same_run(tmp_path):
    """Pretrain (dense vgg11, BN-free; torch DataLoader with a worker process) and BiP (paper,
    tensor loader) from the same source, each run as one process with batch 16 and as two with
    batch 8: same global batches (bip.data.plan), same augmentation draws, so the same metrics
    and final weights up to float round-off."""
    one, two = train_both(tmp_path, ["data.loader=torch", "data.num_workers=1"], 29661)
    assert_same_run(one, two)
    prune = ["data.loader=tensor", "data.num_workers=0", "--exp-mode", "prune", "prune.method=bip", "--layer-type", "unstructured", "--k", "0.2",
             "--source-net", str(one / "final.pt"), "bip.gamma=0.5", "bip.beta=1.0"]
    one, two = train_both(tmp_path, prune, 29663)
    assert_same_run(one, two)
    masks = [torch.load(p / "mask.pt", weights_only=True)["masks"] for p in (one, two)]
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
