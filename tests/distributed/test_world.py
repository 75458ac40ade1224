"""The process count is part of what a result means: train.world_size in the run id (only when
> 1, so 1-process ids stay), from torchrun's WORLD_SIZE or the launcher's profile; recorded in
config.yaml, result.json and index.csv with the global batch; checked at start and on resume;
CUDA RNG states restore on fewer GPUs; train.sync_bn."""
import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import yaml

from bip.rundir import checkpoint
from bip.config import identity
from bip.train import distributed as world
from bip.config import Config, load_config
from bip.errors import BipError
from bip.train import train
from launch import collect, sweep

TINY = ["data.dataset=synthetic", "data.synthetic_size=128", "data.batch_size=16", "train.epochs=1",
        "model.arch=resnet20s", "data.num_workers=0", "train.steps_per_epoch=2"]


def test_world_size_splits_ids_only_beyond_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = load_config([], TINY)
    assert one.train.world_size == 1 and "train.world_size" not in identity.hashed_fields(one)
    assert identity.run_id(one) == identity.run_id(one.replace(**{"train.sync_bn": True}))  # no-op on 1
    two = one.replace(**{"train.world_size": 2})
    assert identity.run_id(two) != identity.run_id(one)
    assert identity.run_id(two) != identity.run_id(two.replace(**{"train.sync_bn": True}))
    # Same global batch, other world size: still another run (the shards, hence BN, differ).
    assert identity.global_batch_size(two) == identity.global_batch_size(
        one.replace(**{"data.batch_size": 32})) == 32
    monkeypatch.setenv("WORLD_SIZE", "4")  # what torchrun exports
    assert load_config([], TINY).train.world_size == 4
    assert load_config([], TINY + ["train.world_size=1"]).train.world_size == 1
    with pytest.raises(BipError, match="train.world_size"):
        load_config([], TINY + ["train.world_size=0"])


def test_a_world_size_other_than_the_process_count_is_refused_before_anything_is_written(tmp_path):
    cfg = load_config([], TINY + [f"run.result_dir={tmp_path}", "train.world_size=2"])
    with pytest.raises(BipError, match=r"train.world_size=2 but 1 process\(es\)"):
        train(cfg)
    assert list(tmp_path.iterdir()) == []


def test_world_size_is_recorded_and_a_checkpoint_of_another_world_size_does_not_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_config([], TINY + [f"run.result_dir={tmp_path}"])
    result = train(cfg)
    folder = identity.run_dir(cfg)
    assert (result["world_size"], result["global_batch_size"]) == (1, 16)
    doc = yaml.safe_load((folder / identity.CONFIG).read_text())
    assert (doc["world_size"], doc["global_batch_size"]) == (1, 16)
    collect.main([str(tmp_path)])
    row = next(csv.DictReader(open(tmp_path / collect.INDEX)))
    assert (row["world_size"], row["global_batch_size"], row["train.world_size"]) == ("1", "16", "1")

    ckpt = checkpoint.load(folder / identity.CHECKPOINT)
    assert ckpt["meta"]["world_size"] == 1
    ckpt["meta"]["world_size"] = 2  # as if two processes had saved it into this folder
    checkpoint.save(folder / identity.CHECKPOINT, ckpt)
    (folder / identity.RESULT).unlink()  # not done: the next start resumes
    with pytest.raises(BipError) as err:
        train(cfg)
    text = str(err.value)
    assert "saved by 2 process(es) (global batch 32)" in text and "this run has 1 (global batch 16)" in text
    assert "\n" not in text

    # --resume of that checkpoint into a fresh folder: one line, exit 2, before any folder exists.
    seed = tmp_path / "seed.pt"
    checkpoint.save(seed, ckpt)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "bip.train", *TINY, f"run.result_dir={tmp_path / 'b'}",
                           f"run.resume={seed}"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and "saved by 2 process(es)" in proc.stderr
    assert not (tmp_path / "b").exists()


def test_a_grid_gives_each_stage_the_world_size_of_its_resources(tmp_path):
    doc = {"name": "w", "profile": "local", "set": {"dataset": "synthetic", "arch": "vgg11"},
           "stages": {"pretrain": {"resources": {"nodes": 2, "tasks_per_node": 2}},
                      "prune": {"set": {"layer_type": "unstructured", "prune.method": "bip"}}},
           "axes": {"k": [0.5]}}
    path = tmp_path / "w.yml"
    path.write_text(yaml.safe_dump(doc))
    plan = sweep.load_grid(path, tmp_path)
    pre, prune = plan.runs["pretrain"][0], plan.runs["prune"][0]
    assert (pre.cfg.train.world_size, prune.cfg.train.world_size) == (4, 1)
    assert prune.parent == pre.key and identity.run_id(pre.cfg) == pre.key.split("/")[0]
    # The same grid on one process per run: other pretrain id, and its prune child follows it.
    del doc["stages"]["pretrain"]["resources"]
    path.write_text(yaml.safe_dump(doc))
    single = sweep.load_grid(path, tmp_path)
    assert single.runs["pretrain"][0].key != pre.key and single.runs["prune"][0].key != prune.key
    assert single.runs["pretrain"][0].cfg.train.world_size == 1
    # --profile replaces the grid's profile, and its tasks count.
    profile = tmp_path / "two.yaml"
    local = yaml.safe_load((sweep.REPO / "slurm" / "profiles" / "local.yaml").read_text())
    profile.write_text(yaml.safe_dump({**local, "tasks_per_node": 2}))
    assert sweep.load_grid(path, tmp_path, str(profile)).runs["pretrain"][0].cfg.train.world_size == 2


def test_cuda_rng_states_restore_on_a_node_with_fewer_gpus(monkeypatch):
    """A checkpoint from a 4-GPU process resumed where one GPU is visible: the first state is
    restored, nothing is asked of devices that do not exist (torch's set_rng_state_all would
    address device 1..3). The torch calls are replaced by recorders; the CPU has no CUDA."""
    calls = []

    def set_state(state, device):
        if device >= 1:
            raise IndexError(f"no CUDA device {device}")  # what a missing device does
        calls.append((int(state[0]), device))

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    saved = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]
    with pytest.raises(IndexError):  # the call this replaces
        for device, state in enumerate(saved):
            torch.cuda.set_rng_state(state, device)
    calls.clear()
    assert checkpoint.set_cuda_rng_states(saved) == 1 and calls == [(0, 0)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # more GPUs than the saver had
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((int(state[0]), device)))
    calls.clear()
    assert checkpoint.set_cuda_rng_states(saved) == 4 and calls == [(i, i) for i in range(4)]
    # Through the checkpoint's own restore path.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    state = {**checkpoint.rng_state(), "cuda": saved}
    calls.clear()
    checkpoint.set_rng_state(state)
    assert calls == [(0, 0), (1, 1)]


def _bn_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def test_sync_bn_converts_batchnorm_only_under_ddp_and_keeps_parameters_and_keys():
    one = Config()
    model = _bn_model()
    assert world.sync_batchnorm(one.replace(**{"train.sync_bn": True}), model, torch.device("cpu")) is model
    two = one.replace(**{"train.world_size": 2})
    assert world.sync_batchnorm(two, model, torch.device("cpu")) is model  # off by default
    with pytest.raises(BipError, match="sync_bn needs GPUs"):
        world.sync_batchnorm(two.replace(**{"train.sync_bn": True}), model, torch.device("cpu"))
    params, keys = [id(p) for p in model.parameters()], list(model.state_dict())
    synced = world.sync_batchnorm(two.replace(**{"train.sync_bn": True}), model, torch.device("cuda"))
    assert isinstance(synced[1], nn.SyncBatchNorm)
    assert [id(p) for p in synced.parameters()] == params and list(synced.state_dict()) == keys


SYNC_BN_SCRIPT = r"""
import sys, torch, torch.distributed as dist, torch.nn as nn
dist.init_process_group("nccl"); rank = dist.get_rank(); torch.cuda.set_device(rank)
torch.manual_seed(0)
bn = nn.BatchNorm2d(4).cuda()
x = torch.randn(8, 4, 5, 5, device="cuda")
ref = bn(x)  # one process, the global batch (the first forward: same running stats either way)
sync = nn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(4)).cuda()
out = sync(x[rank::2])
err = (out - ref[rank::2]).abs().max().item()
stats = (sync.running_mean - bn.running_mean).abs().max().item()
assert err < 1e-5 and stats < 1e-6, (err, stats)
dist.destroy_process_group()
"""


@pytest.mark.gpu
def test_sync_bn_on_two_gpus_normalises_with_the_global_batch(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (NCCL: one rank per GPU)")
    script = tmp_path / "sync_bn.py"
    script.write_text(SYNC_BN_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29671", str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
