"""The invariance harness's worker (tests/test_invariance.py).

``python invariance_worker.py OUT single``: one process trains every method for STEPS steps on
the whole global batch of each step. ``torchrun --nproc_per_node N invariance_worker.py OUT
dist``: N gloo ranks, DDP-wrapped as bip.train wraps them, each on its interleaved shard of the
same global batches (rank r: positions r, r + N, ..., as bip.data.plan shards an epoch). After
every step the worker snapshots the model's state (weights, biases, scores, masks) and every
optimizer's state, in float32 and in float64, for a BN-free model. Under ``dist`` it also
trains a BatchNorm model and records the steps after which the ranks' tensors (all but the BN
running statistics, which are per rank by design) were not bitwise identical, and trains BiP
(paper, and fused) once more with the score gradient formed from each rank's LOCAL g and then
averaged (the pre-gsync behaviour, mean of g_r^2 instead of (mean g)^2). Rank 0 / the single process
saves everything to OUT.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from bip.methods import gsync, imp_levels as imp
from bip.pruning import masking
from bip.config import load_config
from bip.pruning.layers import LayerFactory, score_grad
from bip.methods.base import all_reduce_grads
from bip.methods.registry import create_method

STEPS, GLOBAL_BATCH = 3, 8
METHODS = ("dense", "finetune", "hydra", "bip", "bip-fused", "bip-reference", "imp")
out, mode = sys.argv[1], sys.argv[2]
if mode == "dist":
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if mode == "dist" else (0, 1)
torch.set_num_threads(1)


def config(method: str):
    # 4 epochs: the released code's cosine lr of epoch 0 is 0 when there is only one.
    base = ["train.epochs=4", "optim.lr=0.5", "bip.gamma=0.05", "bip.beta=5.0", "bip.alpha=0.05"]
    if method == "dense":
        return load_config([], base + ["run.stage=pretrain"])
    if method == "finetune":
        return load_config([], base + ["run.stage=finetune", "prune.layer_type=unstructured", "prune.k=0.3"])
    name, _, variant = method.partition("-")
    # An IMP round prunes at most imp_rate of what its parent (here: dense) kept.
    k = "prune.k=0.5" if name == "imp" else "prune.k=0.3"
    extra = ["prune.imp_rate=0.5"] if name == "imp" else []
    return load_config([], base + extra + [
        "run.stage=prune", "prune.layer_type=unstructured", k, f"prune.method={name}",
        f"bip.variant={variant or 'paper'}", "prune.score_init=magnitude"])


def tiny_model(layer_type: str, batch_norm: bool) -> nn.Module:
    """A small CNN made of bip's masked layers (the layer factory every registered arch uses)."""
    f = LayerFactory(layer_type)
    bn = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
    return nn.Sequential(f.conv(3, 8, 3, padding=1, bias=not batch_norm), bn(8), nn.ReLU(),
                         f.conv(8, 8, 3, padding=1, bias=not batch_norm), bn(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), f.linear(8, 10))


def build(method: str, batch_norm: bool):
    cfg = config(method)
    torch.manual_seed(0)
    model = tiny_model(cfg.prune.layer_type, batch_norm)
    rewind = None
    if method == "finetune":  # a pruned source: random scores, their top-k mask
        with torch.no_grad():
            for _, m in masking.masked_layers(model):
                m.scores.uniform_()
        masking.refresh_masks(model, cfg.prune.k)
    if method == "imp":
        rewind = imp.Source(density=1.0, round=0,  # round 1, from a dense parent
                            rewind={k: v.clone() for k, v in model.state_dict().items()})
        with torch.no_grad():  # the run's weights have moved away from the rewind point
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    m = create_method(cfg, model, rewind)
    if mode == "dist":
        m.attach(nn.parallel.DistributedDataParallel(model, broadcast_buffers=False))
    m.on_epoch_start(0)
    return m


def global_batches(step: int, streams: int, dtype):
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g).to(dtype),
             torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)) for _ in range(streams)]


def snapshot(m) -> dict:
    state = {f"model.{k}": v.detach().clone() for k, v in m.core.state_dict().items()}
    for name, opt in m.state_dict().items():
        if name.startswith("_"):  # the mask monitor's sums and step counter, not an optimizer
            continue
        for index, slots in opt["state"].items():
            for slot, value in slots.items():
                if torch.is_tensor(value):
                    state[f"{name}.{index}.{slot}"] = value.detach().clone()
    return state


def ranks_agree(state: dict) -> bool:
    """Every tensor but BN running statistics bitwise equal on all ranks."""
    kept = [v.double().flatten() for k, v in sorted(state.items()) if "running_" not in k]
    flat = torch.cat(kept)
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    return all(torch.equal(copies[0], c) for c in copies[1:])


def train(method: str, dtype, batch_norm: bool = False) -> tuple[list[dict], list[int]]:
    torch.set_default_dtype(dtype)
    try:
        m = build(method, batch_norm)
        snaps, disagree = [], []
        for step in range(STEPS):
            batches = [(x[rank::world], y[rank::world]) for x, y in global_batches(step, m.streams, dtype)]
            m.step(batches, step / STEPS)
            snaps.append(snapshot(m))
            if mode == "dist" and not ranks_agree(snaps[-1]):
                disagree.append(step)
        return snaps, disagree
    finally:
        torch.set_default_dtype(torch.float32)


class LocalSquareThenAverage:
    """The pre-gsync BiP under DDP: each rank forms sign(S) * (W - M g_r / gamma) * g_r from its
    own g_r, then the score gradients are averaged (what DDP's gradient all-reduce does)."""

    def __init__(self, ig_coeff: float, bucket_bytes=None):
        self.ig_coeff, self.layers = ig_coeff, []

    def add(self, layer, g):
        grad = score_grad(layer.weight, layer.scores, layer.mask, g, self.ig_coeff)
        layer.scores.grad = grad if layer.scores.grad is None else layer.scores.grad + grad
        self.layers.append(layer)

    def finish(self):
        all_reduce_grads([layer.scores for layer in self.layers])


report = {"world": world, "runs": {}, "disagree": {}}
for dtype in (torch.float32, torch.float64):
    for method in METHODS:
        snaps, disagree = train(method, dtype)
        report["runs"][f"{method}/{dtype}"] = snaps
        report["disagree"][f"{method}/{dtype}"] = disagree
if mode == "dist":
    for method in METHODS:  # BatchNorm in train mode: per-rank statistics, identical parameters
        report["disagree"][f"{method}/bn"] = train(method, torch.float32, batch_norm=True)[1]
    gsync.GReducer = LocalSquareThenAverage
    report["runs"]["bip-local-g2/torch.float32"] = train("bip", torch.float32)[0]
    report["runs"]["bip-fused-local-g2/torch.float32"] = train("bip-fused", torch.float32)[0]
if rank == 0:
    torch.save(report, out)
if mode == "dist":
    # every rank waits for rank 0's save: a rank tearing gloo down while a peer still talks to it
    # can abort ("terminate called without an active exception", seen once in CI with 4 ranks)
    dist.barrier()
    # Then leave without running gloo's C++ teardown: with 4 ranks on 2 cores it still aborted
    # ("terminate called without an active exception", exit -6) after the barrier in CI. Rank 0's
    # report is closed on disk by now, and nothing else is left to write.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
