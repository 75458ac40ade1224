"""Which samples each rank reads at each training step, with which random draws, on how many CPUs.

An epoch of a training stream is a pure function of (seed, stream, epoch). One generator seeded
with ``stream_seed(seed, stream, epoch)`` draws the permutation of the whole training split and
then one augmentation draw per permutation position, for the GLOBAL epoch (all ranks together),
before anything is sharded. With G = batch x world (the global batch), global step s holds the
positions [s*G, (s+1)*G); rank r reads the positions s*G + r, s*G + r + world, ... (the
interleaving of torch's DistributedSampler, per step). So N processes with a per-process batch
B/N read exactly the samples and draws, step by step, that one process with batch B reads, and
an epoch resumed at step k is an index offset (nothing is replayed).
"""
from __future__ import annotations

import os

import torch

from bip.errors import BipError


def stream_seed(seed: int, stream: int, epoch: int) -> int:
    return ((seed * 1_000_003 + stream) * 1_000_003 + epoch) % (2**63 - 1)


def epoch_generator(seed: int, stream: int, epoch: int) -> torch.Generator:
    """The CPU generator of one (seed, stream, epoch): CPU so that the draws, hence the result,
    are the same whatever device trains."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, epoch))


def steps_per_epoch(n: int, batch: int, world: int) -> int:
    """Full global batches of ``batch`` x ``world`` in ``n`` samples (the rest is dropped)."""
    steps = n // (batch * world)
    if steps == 0:
        raise BipError(f"training split of {n} images is smaller than one batch of {batch} per "
                       f"rank x {world} ranks")
    return steps


def check_start(start: int, steps: int) -> None:
    if not 0 <= start <= steps:
        raise BipError(f"cannot start an epoch at step {start}: it has {steps} steps")


def shard(columns: torch.Tensor, batch: int, rank: int, world: int, steps: int,
          start: int = 0) -> torch.Tensor:
    """Rank ``rank``'s share of per-position columns ``[..., n]`` of the global epoch, from step
    ``start`` on: ``[..., (steps - start) * batch]``; local column q is global position
    world * q + rank, so local step s holds global step s's r-th interleaved shard."""
    g = batch * world
    return columns[..., start * g + rank: steps * g: world]


def cpu_budget(num_workers: int) -> int:
    """Loader worker processes for the whole run: data.num_workers, capped by the CPUs this
    process may use (Slurm's SLURM_CPUS_PER_TASK when set, else its CPU affinity): more workers
    than CPUs only thrash."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if cpus.isdigit() and int(cpus) > 0:
        available = int(cpus)
    else:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(num_workers, available or 1))


def split_workers(total: int, streams: int) -> list[int]:
    """``total`` workers shared by the training streams that read at the same time (BiP: 2),
    instead of each asking for all of them; the first streams take the remainder."""
    return [total // streams + (s < total % streams) for s in range(streams)]
