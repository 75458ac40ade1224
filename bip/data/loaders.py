"""Train / validation / test loaders, sharded over DDP ranks and reproducible per epoch.

Every training epoch is a pure function of (seed, stream, epoch): the shuffle and the
augmentation draws come from a generator seeded with those three numbers, so a resumed run
sees exactly the batches an uninterrupted one would. BiP reads two independent streams (0 and
1) of the same training split. All ranks draw the same permutation and each takes its own
slice; training batches are full (drop_last) so every rank runs the same number of steps.
The validation split is held out of the training split with ``data.split_seed``, the same
for every run, so model selection never sees the test set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from bip.data import ArraySplit, DatasetSpec
from bip.errors import BipError

Batch = tuple[torch.Tensor, torch.Tensor]


def stream_seed(seed: int, stream: int, epoch: int) -> int:
    return ((seed * 1_000_003 + stream) * 1_000_003 + epoch) % (2**63 - 1)


def split_indices(n: int, val_fraction: float, split_seed: int, data_fraction: float = 1.0):
    """(train, val) index tensors: a fixed random held-out slice, then an optional subsample."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_val = int(round(n * val_fraction))
    val, train = order[:n_val], order[n_val:]
    train = train[: max(1, int(round(len(train) * data_fraction)))]
    return train.sort().values, val.sort().values


def rank_slice(perm: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's equal share of a permutation (at most world-1 samples left out)."""
    per_rank = len(perm) // world
    return perm[rank * per_rank:(rank + 1) * per_rank]


class _Normalize:
    def __init__(self, spec: DatasetSpec, normalize: bool, device: torch.device):
        mean, std = (spec.mean, spec.std) if normalize else ((0.0,) * 3, (1.0,) * 3)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class TensorStream:
    """One training stream over an in-memory uint8 split: batched pad-crop + flip on device."""

    def __init__(self, split: ArraySplit, batch_size: int, augment: bool, normalize: _Normalize,
                 seed: int, stream: int, rank: int, world: int, device: torch.device, pad: int = 4):
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.batch_size, self.augment, self.normalize, self.pad = batch_size, augment, normalize, pad
        self.seed, self.stream, self.rank, self.world, self.device = seed, stream, rank, world, device
        self.steps = (len(split) // world) // batch_size
        if self.steps == 0:
            raise BipError(f"training split of {len(split)} images is smaller than one batch of "
                           f"{batch_size} per rank x {world} ranks")

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from step ``start`` on (a resumed epoch): the skipped steps
        only draw their augmentation numbers, so the generator is where it would be."""
        g = torch.Generator().manual_seed(stream_seed(self.seed, self.stream, epoch))
        index = rank_slice(torch.randperm(len(self.labels), generator=g), self.rank, self.world)
        b, (h, w) = self.batch_size, self.images.shape[-2:]
        for step in range(self.steps):
            if self.augment:
                shift = torch.randint(0, 2 * self.pad + 1, (2, b), generator=g)
                flip = torch.rand(b, generator=g) < 0.5
            if step < start:
                continue
            idx = index[step * b:(step + 1) * b].to(self.device)
            x = self.normalize(self.images[idx])
            if self.augment:
                x = _crop_flip(x, shift.to(self.device), flip.to(self.device), self.pad, h, w, self.normalize)
            yield x, self.labels[idx]


def _crop_flip(x, shift, flip, pad, h, w, normalize):
    # Pad with black (pixel 0, as torchvision's RandomCrop on the raw image), crop per sample.
    black = normalize(torch.zeros(1, x.shape[1], 1, 1, device=x.device))
    padded = F.pad(x - black, (pad, pad, pad, pad)) + black
    rows = (shift[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (shift[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(len(x), device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def _tensor_eval(split: ArraySplit, batch_size: int, normalize: _Normalize, rank: int, world: int,
                 device: torch.device) -> Callable[[], Iterator[Batch]]:
    images, labels = split.images[rank::world].to(device), split.labels[rank::world].to(device)

    def batches() -> Iterator[Batch]:
        for i in range(0, len(labels), batch_size):
            yield normalize(images[i:i + batch_size]), labels[i:i + batch_size]
    return batches


class _Transformed(Dataset):
    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return self.transform(image), label


def _imagenet_transforms(spec: DatasetSpec, normalize: bool, augment: bool):
    from torchvision import transforms as T
    size = spec.image_size
    tail = [T.ToTensor()] + ([T.Normalize(spec.mean, spec.std)] if normalize else [])
    train = ([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if augment
             else [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)])
    test = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    return T.Compose(train + tail), T.Compose(test + tail)


class TorchStream:
    """One training stream through a DataLoader (ImageNet folders / LMDB)."""

    def __init__(self, dataset: Dataset, batch_size: int, workers: int, seed: int, stream: int,
                 rank: int, world: int, device: torch.device):
        self.dataset, self.batch_size, self.workers = dataset, batch_size, workers
        self.seed, self.stream, self.rank, self.world, self.device = seed, stream, rank, world, device
        self.steps = (len(dataset) // world) // batch_size
        if self.steps == 0:
            raise BipError(f"training split of {len(dataset)} images is smaller than one batch")

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from step ``start`` on: the same samples as an uninterrupted
        epoch. Augmentation is identical with num_workers=0 (transforms draw from the global
        RNG, which the checkpoint restores); with workers, per-worker seeding differs."""
        g = torch.Generator().manual_seed(stream_seed(self.seed, self.stream, epoch))
        index = rank_slice(torch.randperm(len(self.dataset), generator=g), self.rank, self.world)
        index = index[start * self.batch_size:]
        # The loader's generator seeds the workers, so augmentation is reproducible too.
        loader = DataLoader(self.dataset, self.batch_size, sampler=index.tolist(), drop_last=True,
                            num_workers=self.workers, generator=g,
                            pin_memory=self.device.type == "cuda")
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _torch_eval(dataset: Dataset, batch_size: int, workers: int, rank: int, world: int,
                device: torch.device) -> Callable[[], Iterator[Batch]]:
    shard = Subset(dataset, list(range(rank, len(dataset), world)))

    def batches() -> Iterator[Batch]:
        for x, y in DataLoader(shard, batch_size, num_workers=workers,
                               pin_memory=device.type == "cuda"):
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return batches


@dataclass
class Loaders:
    """What the training loop reads: ``streams[i].epoch(e)`` batches, and eval callables."""

    streams: list  # TensorStream | TorchStream | ffcv stream, one per training stream
    val: Callable[[], Iterable[Batch]] | None
    test: Callable[[], Iterable[Batch]]
    num_classes: int
    input_shape: tuple[int, int, int]
    val_size: int
    test_size: int


def build_loaders(cfg, spec: DatasetSpec, *, seed: int, streams: int, rank: int, world: int,
                  device: torch.device) -> Loaders:
    """Loaders for ``cfg`` (a DataConfig) over ``spec``; ``streams`` = 2 for BiP."""
    kind = cfg.loader
    if kind == "ffcv":
        from bip.data.ffcv import build_ffcv_loaders
        return build_ffcv_loaders(cfg, spec, seed=seed, streams=streams, rank=rank, world=world,
                                  device=device)
    arrays = isinstance(spec.train, ArraySplit)
    if kind == "auto":
        kind = "tensor" if arrays else "torch"
    if kind == "tensor" and not arrays:
        raise BipError(f"data.loader=tensor needs an in-memory dataset; {cfg.dataset} is read from files")
    train_idx, val_idx = split_indices(len(spec.train), cfg.val_fraction, cfg.split_seed,
                                       cfg.data_fraction)
    if arrays and kind == "tensor":
        norm = _Normalize(spec, cfg.normalize, device)
        train, val = spec.train.subset(train_idx), spec.train.subset(val_idx)
        make = [TensorStream(train, cfg.batch_size, cfg.augment, norm, seed, s, rank, world, device)
                for s in range(streams)]
        val_fn = _tensor_eval(val, cfg.test_batch_size, norm, rank, world, device) if len(val) else None
        test_fn = _tensor_eval(spec.test, cfg.test_batch_size, norm, rank, world, device)
        shape = tuple(spec.train.images.shape[1:])
    else:
        base_train, base_test = spec.train, spec.test
        if arrays:  # in-memory data through a DataLoader (only when asked for)
            base_train, base_test = _ArrayPIL(spec.train), _ArrayPIL(spec.test)
        train_tf, test_tf = _imagenet_transforms(spec, cfg.normalize, cfg.augment) if spec.style == "imagenet" \
            else _small_transforms(spec, cfg.normalize, cfg.augment)
        train_ds = Subset(_Transformed(base_train, train_tf), train_idx.tolist())
        val_ds = Subset(_Transformed(base_train, test_tf), val_idx.tolist())
        make = [TorchStream(train_ds, cfg.batch_size, cfg.num_workers, seed, s, rank, world, device)
                for s in range(streams)]
        val_fn = _torch_eval(val_ds, cfg.test_batch_size, cfg.num_workers, rank, world, device) \
            if len(val_ds) else None
        test_fn = _torch_eval(_Transformed(base_test, test_tf), cfg.test_batch_size,
                              cfg.num_workers, rank, world, device)
        shape = (3, spec.image_size, spec.image_size)
    return Loaders(make, val_fn, test_fn, spec.num_classes, shape, len(val_idx), len(spec.test))


class _ArrayPIL(Dataset):
    """An ArraySplit as PIL images, for data.loader=torch on small datasets."""

    def __init__(self, split: ArraySplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i):
        from torchvision.transforms.functional import to_pil_image
        return to_pil_image(self.split.images[i]), int(self.split.labels[i])


def _small_transforms(spec: DatasetSpec, normalize: bool, augment: bool):
    from torchvision import transforms as T
    tail = [T.ToTensor()] + ([T.Normalize(spec.mean, spec.std)] if normalize else [])
    size = spec.image_size
    train = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()] if augment else []
    return T.Compose(train + tail), T.Compose(tail)
