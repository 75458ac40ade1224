"""Train / validation / test loaders, sharded over DDP ranks, reproducible per epoch, resumable
at any step, and invariant to the number of processes.

``streams[i].epoch(e, start=k)`` yields the batches of epoch ``e`` from step ``k`` on; every
epoch is a pure function of (seed, stream, epoch) drawn for the global batch (data.batch_size
x world size) before sharding (bip.data.plan), so a resumed run sees exactly the batches an
uninterrupted one would and N ranks together see what one process with an N times larger
batch sees. BiP reads two independent streams (0 and 1) of the same training split. Training
batches are full, so every rank runs the same number of steps. The validation split is held
out of the training split with ``data.split_seed``, the same for every run; evaluation reads
the disjoint shards rank::world, each sample once, never padded.

This module only dispatches on data.loader: in-memory datasets to bip.data.tensor_loader, image
files to bip.data.torch_loader (persistent DataLoader workers), .beton files to bip.data.ffcv.
"""
from __future__ import annotations

import torch

from bip.data.base import ArraySplit, DatasetSpec, Loaders, split_indices
from bip.errors import BipError


def build_loaders(cfg, spec: DatasetSpec, *, seed: int, streams: int, rank: int, world: int,
                  device: torch.device) -> Loaders:
    """Loaders for ``cfg`` (a DataConfig) over ``spec``; ``streams`` = 2 for BiP; ``rank`` and
    ``world`` shard every batch (cfg.batch_size is per process)."""
    kind = cfg.loader
    if kind == "ffcv":
        from bip.data.ffcv.loader import build_ffcv_loaders
        made = build_ffcv_loaders(cfg, spec, seed=seed, streams=streams, rank=rank, world=world,
                                  device=device)
    else:
        arrays = isinstance(spec.train, ArraySplit)
        if kind == "auto":
            kind = "tensor" if arrays else "torch"
        if kind == "tensor" and not arrays:
            raise BipError(f"data.loader=tensor needs an in-memory dataset; {cfg.dataset} is read from files")
        train_idx, val_idx = split_indices(len(spec.train), cfg.val_fraction, cfg.split_seed,
                                           cfg.data_fraction)
        if kind == "tensor":
            from bip.data.tensor_loader import build_tensor_loaders
            made = build_tensor_loaders(cfg, spec, train_idx, val_idx, seed, streams, rank, world, device)
        else:
            from bip.data.torch_loader import build_torch_loaders
            made = build_torch_loaders(cfg, spec, train_idx, val_idx, seed=seed, streams=streams,
                                       rank=rank, world=world, device=device)
    made.global_batch, made.world = cfg.batch_size * world, world
    return made
