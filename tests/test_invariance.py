"""A result does not depend on the process count: for every method (dense pretrain, finetune,
hydra, bip paper, bip reference, an imp round), N = 2 and 4 gloo ranks, each on its interleaved
shard of a global batch, hold after every one of 3 steps the same weights, scores, masks and
optimizer state as ONE process on the whole global batch: to 1e-6 in float32, 1e-12 in float64
(BN-free model: its forward does not couple samples). With train-mode BatchNorm the ranks see
their own statistics, so there the ranks must agree bitwise with each other after every step.
BiP's old DDP behaviour (each rank squares its local g, then the score gradients are averaged)
breaks the invariant by orders of magnitude; the gsync all-reduce of g before squaring keeps it.

One worker process per N trains everything (tests/invariance_worker.py); the three jobs run
at the same time.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "invariance_worker.py")
METHODS = ("dense", "finetune", "hydra", "bip", "bip-reference", "imp")
TOLERANCE = {"torch.float32": 1e-6, "torch.float64": 1e-12}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    """{1: single-process report, 2: ..., 4: ...} (see the worker's docstring)."""
    folder = tmp_path_factory.mktemp("invariance")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    commands = {1: [sys.executable, WORKER, str(folder / "1.pt"), "single"]}
    for n, port in ((2, 29641), (4, 29643)):
        commands[n] = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                       "--master_port", str(port), WORKER, str(folder / f"{n}.pt"), "dist"]
    procs = {n: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env) for n, cmd in commands.items()}
    for n, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"N={n}: {err[-3000:]}"
    return {n: torch.load(folder / f"{n}.pt", weights_only=True) for n in commands}


def max_difference(a: list[dict], b: list[dict]) -> float:
    """Largest absolute difference between two runs' per-step snapshots (same keys, shapes)."""
    assert len(a) == len(b) == 3
    worst = 0.0
    for step_a, step_b in zip(a, b):
        assert step_a.keys() == step_b.keys()
        for key, x in step_a.items():
            y = step_b[key]
            assert x.dtype == y.dtype and x.shape == y.shape, key
            if x.numel():
                worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
@pytest.mark.parametrize("method", METHODS)
def test_n_ranks_on_shards_equal_one_process_on_the_global_batch(reports, method, dtype, n):
    key = f"{method}/{dtype}"
    assert reports[n]["world"] == n
    one, many = reports[1]["runs"][key], reports[n]["runs"][key]
    assert max_difference(one, many) <= TOLERANCE[dtype]
    assert reports[n]["disagree"][key] == []
    # Not vacuous: every step moved the trained tensors, and the snapshot covers the optimizers.
    trained = "scores" if method in ("hydra", "bip", "bip-reference") else "weight"
    for before, after in zip(one, one[1:]):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith(trained))
    if method != "imp":  # imp's round starts with fresh momentum (its first step fills it)
        assert any(".momentum_buffer" in k for k in one[-1])


def test_masks_change_during_the_compared_steps(reports):
    """BiP and HYDRA re-rank every step: the compared masks are not the initial ones only."""
    for method in ("bip", "bip-reference", "hydra"):
        snaps = reports[1]["runs"][f"{method}/torch.float64"]
        masks = [torch.cat([v.flatten() for k, v in s.items() if k.endswith("mask")]) for s in snaps]
        assert not torch.equal(masks[0], masks[-1]), method


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("method", METHODS)
def test_batchnorm_models_keep_every_rank_identical(reports, method, n):
    assert reports[n]["disagree"][f"{method}/bn"] == []


@pytest.mark.parametrize("n", [2, 4])
def test_squaring_each_ranks_local_g_breaks_the_invariant_that_gsync_keeps(reports, n):
    one = reports[1]["runs"]["bip/torch.float32"]
    fixed = max_difference(one, reports[n]["runs"]["bip/torch.float32"])
    local = max_difference(one, reports[n]["runs"]["bip-local-g2/torch.float32"])
    assert fixed <= 1e-6 and local > 1e-3, (fixed, local)


# -- end to end: the same `python -m bip.train` command on 1 process with batch B and on 2 with B/2

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
    import json
    a, b = (json.loads((p / "result.json").read_text()) for p in (one, two))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert a["global_batch_size"] == b["global_batch_size"] == 16
    assert a["run_id"] != b["run_id"]  # another world size is another run folder
    differ = {k for k in a if a[k] != b[k]} - {"run_id", "world_size", "wall_time_s", "parent_id"}
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
