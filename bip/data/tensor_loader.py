"""The in-memory backend (data.loader=tensor): the dataset is uploaded to the device once, shared
by both streams and the validation split, and augmented there in batches; each epoch's plan
(permutation, crop offsets, flips) goes to the device in one pinned, non-blocking copy, so
drawing a batch never waits for the host."""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from bip.data.base import ArraySplit, Batch, DatasetSpec, Loaders
from bip.data.plan import check_start, epoch_generator, shard, steps_per_epoch


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One host tensor to the device without making the host wait: pinned, non-blocking."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


class DeviceImages:
    """A uint8 split on the device (uploaded once, shared by every stream and evaluation that
    reads it), and the batch ops on it: gather, pad-crop + flip, normalise. All device ops with
    shapes known on the host: no step waits for the device."""

    def __init__(self, split: ArraySplit, spec: DatasetSpec, normalize: bool, device: torch.device):
        mean, std = (spec.mean, spec.std) if normalize else ((0.0,) * 3, (1.0,) * 3)
        channels = split.images.shape[1]
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)[:, :channels] * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)[:, :channels] * 255
        self.device, self.shape = device, tuple(split.images.shape[1:])
        self._range = {}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std

    def arange(self, n: int) -> torch.Tensor:
        if n not in self._range:  # made once per size, not at every step
            self._range[n] = torch.arange(n, device=self.device)
        return self._range[n]

    def crop_flip(self, idx, dy, dx, flip, pad: int) -> torch.Tensor:
        """torchvision's RandomCrop(padding=pad) + RandomHorizontalFlip on uint8 pixels (black
        fill), with the draws given: offsets dy, dx in [0, 2 pad], flip in {0, 1}; one gather."""
        x = F.pad(self.images[idx], (pad, pad, pad, pad))
        (c, h, w), b = self.shape, len(idx)
        cols = self.arange(w)
        cols = torch.where(flip[:, None].bool(), w - 1 - cols, cols)  # flipped crop, read mirrored
        rows = (dy[:, None] + self.arange(h))[:, None, :, None]
        cols = (dx[:, None] + cols)[:, None, None, :]
        return x[self.arange(b)[:, None, None, None], self.arange(c)[None, :, None, None], rows, cols]


class TensorStream:
    """One training stream over a DeviceImages split: ``epoch(e, start)`` yields the batches
    of epoch e from step ``start``, augmented on the device; ``len`` = steps per epoch."""

    PAD = 4

    def __init__(self, data: DeviceImages, indices: torch.Tensor, batch_size: int, augment: bool,
                 seed: int, stream: int, rank: int, world: int):
        self.data, self.indices, self.batch_size, self.augment = data, indices, batch_size, augment
        self.seed, self.stream, self.rank, self.world = seed, stream, rank, world
        self.steps = steps_per_epoch(len(indices), batch_size, world)

    def __len__(self) -> int:
        return self.steps

    def plan(self, epoch: int, start: int = 0) -> torch.Tensor:
        """This rank's rows (sample index, dy, dx, flip) x (steps - start) * batch, on the
        device. Drawn on the CPU for the whole global epoch (bip.data.plan), sharded, then one
        copy: the device gets all of an epoch's draws at once."""
        g = epoch_generator(self.seed, self.stream, epoch)
        n = len(self.indices)
        rows = [self.indices[torch.randperm(n, generator=g)]]
        if self.augment:
            rows += [*torch.randint(0, 2 * self.PAD + 1, (2, n), generator=g),
                     (torch.rand(n, generator=g) < 0.5).long()]
        plan = shard(torch.stack(rows), self.batch_size, self.rank, self.world, self.steps, start)
        return to_device(plan.contiguous(), self.data.device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        check_start(start, self.steps)
        plan, b, data = self.plan(epoch, start), self.batch_size, self.data
        for q in range(0, plan.shape[1], b):
            step = plan[:, q:q + b]
            if self.augment:
                x = data.crop_flip(step[0], step[1], step[2], step[3], self.PAD)
            else:
                x = data.images[step[0]]
            yield data.normalize(x), data.labels[step[0]]


def _tensor_eval(data: DeviceImages, indices: torch.Tensor | None, batch_size: int, rank: int,
                 world: int) -> Callable[[], Iterator[Batch]]:
    """Sequential batches of this rank's shard rank::world of ``indices`` (all when None)."""
    if indices is None:
        images, labels = data.images[rank::world], data.labels[rank::world]  # views, no copy

        def batches() -> Iterator[Batch]:
            for i in range(0, len(labels), batch_size):
                yield data.normalize(images[i:i + batch_size]), labels[i:i + batch_size]
        return batches
    mine = to_device(indices[rank::world].contiguous(), data.device)

    def indexed() -> Iterator[Batch]:
        for i in range(0, len(mine), batch_size):
            idx = mine[i:i + batch_size]
            yield data.normalize(data.images[idx]), data.labels[idx]
    return indexed


def build_tensor_loaders(cfg, spec, train_idx, val_idx, seed, streams, rank, world, device) -> Loaders:
    train = DeviceImages(spec.train, spec, cfg.normalize, device)  # one upload for all streams
    made = [TensorStream(train, train_idx, cfg.batch_size, cfg.augment, seed, s, rank, world)
            for s in range(streams)]
    val_fn = _tensor_eval(train, val_idx, cfg.test_batch_size, rank, world) if len(val_idx) else None
    test = DeviceImages(spec.test, spec, cfg.normalize, device)
    test_fn = _tensor_eval(test, None, cfg.test_batch_size, rank, world)
    return Loaders(made, val_fn, test_fn, spec.num_classes, train.shape, len(val_idx), len(spec.test))
