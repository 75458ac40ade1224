"""How many processes train a run, and what that changes.

``train.world_size`` (a config field, hence part of the run id when > 1) must equal the
number of processes accelerate started: ``data.batch_size`` is per process, so the global
batch, and with it the result, depends on the process count. A checkpoint records the world
size it was saved under; resuming it under another one would continue with another global
batch and another sharding, so it is refused. ``train.sync_bn`` turns BatchNorm into
SyncBatchNorm under DDP: train-mode statistics over the global batch instead of each rank's
shard (the one part of a step that otherwise depends on the process count).

``Ranks`` answers every rank and world-size question of a run (which rank writes, how to
broadcast a decision, how to sum over ranks); ``gsync.world_size`` is the one test of "is a
process group up" that the methods below the trainer share.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from bip.config import Config
from bip.errors import BipError
from bip.methods.gsync import world_size


def check_processes(cfg: Config, processes: int) -> None:
    """The run's declared world size is the one it runs with (before anything is written)."""
    if cfg.train.world_size != processes:
        hint = (" (on CPU, torchrun needs ACCELERATE_USE_CPU=1 to start DDP)"
                if processes == 1 and not torch.cuda.is_available() else "")
        raise BipError(f"train.world_size={cfg.train.world_size} but {processes} process(es) run this "
                       f"training{hint}; the global batch (data.batch_size x world size) is part of "
                       "the run's identity")


def check_checkpoint(meta: object, cfg: Config, path: Path) -> None:
    """A checkpoint saved under another world size does not resume (a bip-checkpoint-1 file
    may lack the field: it is taken as it is)."""
    saved = meta.get("world_size") if isinstance(meta, dict) else None
    if saved is not None and saved != cfg.train.world_size:
        raise BipError(f"{path} was saved by {saved} process(es) (global batch "
                       f"{cfg.data.batch_size * saved}); this run has {cfg.train.world_size} "
                       f"(global batch {cfg.data.batch_size * cfg.train.world_size}): "
                       f"resume it with world size {saved}")


def sync_batchnorm(cfg: Config, model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with SyncBatchNorm layers when train.sync_bn and the run has several processes.
    Called before the optimizers, the compile and DDP see the model; parameter objects and
    state_dict keys stay the same, so checkpoints and final.pt are those of the plain model."""
    if not cfg.train.sync_bn or cfg.train.world_size == 1:
        return model
    if device.type == "cpu":  # torch's SyncBatchNorm raises in training on CPU tensors
        raise BipError("train.sync_bn needs GPUs: torch's SyncBatchNorm does not run on CPU")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


TOTALS = ("loss", "correct", "n")  # what Method.step returns, summed over an epoch's steps


def reduce_totals(totals: dict) -> dict:
    """An epoch's running sums over every rank (each rank sums its own shard's): what
    metrics.jsonl's train_loss / train_acc and a step checkpoint hold, so they are those of
    the global batches whatever the process count. One all-reduce, at a logging point."""
    if world_size() == 1:
        return totals
    device = next((v.device for v in totals.values() if torch.is_tensor(v)), None)
    if device is None:  # nothing summed yet on this rank: the process group's device
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.stack([torch.as_tensor(totals.get(k, 0), dtype=torch.float64, device=device)
                        for k in TOTALS])
    dist.all_reduce(flat)
    return dict(zip(TOTALS, flat.unbind()))


class Ranks:
    """The processes of one run (accelerate's view): who is main, how many there are, and the
    few collectives the trainer itself makes (the methods make their own, bip.methods.gsync)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.main, self.index = accelerator.is_main_process, accelerator.process_index
        self.world, self.device = accelerator.num_processes, accelerator.device

    def broadcast(self, value):
        """The main rank's ``value`` on every rank (a pickled object: start-up decisions only)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if world_size() > 1:
            dist.barrier()

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        if world_size() > 1:
            dist.all_reduce(tensor)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to run forwards through: DDP-wrapped under several processes."""
        return self.accelerator.prepare_model(model) if self.world > 1 else model

    def average_batchnorm_stats(self, model: nn.Module) -> None:
        """Average BN running statistics over ranks before an evaluation (DDP runs with
        broadcast_buffers=False so the masks, also buffers, are not re-sent every forward)."""
        if world_size() == 1:
            return
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                for buf in (m.running_mean, m.running_var):
                    dist.all_reduce(buf)
                    buf /= dist.get_world_size()

    def device_name(self) -> str:
        return torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"
