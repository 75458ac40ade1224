"""data.loader=torch: image files (ImageNet folders / LMDB), or in-memory data when asked for,
decoded and augmented per sample by torchvision transforms in DataLoader worker processes.

The DataLoaders are built once per run and keep their workers (persistent_workers) across
epochs and evaluations; what changes per epoch is the list their sampler hands out. The list
is the tensor loader's plan (bip.data.plan): the global epoch's permutation plus one seed per
position, drawn from (seed, stream, epoch) before sharding. A worker seeds torch's generator
with an item's seed just before its random transform, so a sample's crop and flip do not
depend on which worker, rank or world size loads it: N ranks with batch B/N together read
exactly the samples and pixels one process with batch B reads, and an epoch can start at any
step. BiP's two training streams share the worker budget (bip.data.plan.cpu_budget) instead of
each asking for data.num_workers.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bip.data.base import ArraySplit, Batch, DatasetSpec, Loaders
from bip.data.plan import (check_start, cpu_budget, epoch_generator, shard, split_workers, stream_seed,
                           steps_per_epoch)

SEED_RANGE = 2**62


class SeededItems(Dataset):
    """``base[index]`` through ``transform``, addressed by ``(index, seed)``: with a seed, the
    transform's random draws come from torch's CPU generator seeded with it (restored
    afterwards, which matters without workers: it is then the main process's)."""

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item):
        index, seed = item
        image, label = self.base[index]
        if seed is None:
            return self.transform(image), label
        # Only the CPU generator (what the transforms draw from): torch.manual_seed would also
        # queue a CUDA seeding with a captured stack, ~0.5 ms per sample.
        generator = torch.default_generator
        state = generator.get_state()
        try:
            generator.manual_seed(seed)
            return self.transform(image), label
        finally:
            generator.set_state(state)


class _Eval(Dataset):
    """The validation (held out of base_train) and test items, addressed by (split, index)."""

    def __init__(self, splits: tuple[Dataset, Dataset], transform):
        self.splits = [SeededItems(s, transform) for s in splits]

    def __getitem__(self, item):
        which, index = item
        return self.splits[which][index, None]

    def __len__(self) -> int:
        return sum(len(s) for s in self.splits)


class ListSampler(Sampler):
    """Hands out ``items``, set before each pass: the per-epoch sampler of a DataLoader whose
    workers persist (a DataLoader iterates its sampler afresh at every pass)."""

    def __init__(self):
        self.items: list = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def _loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device, seed: int,
            drop_last: bool) -> tuple[DataLoader, ListSampler]:
    sampler = ListSampler()
    # The generator only seeds worker processes (the augmentation is seeded per item); giving
    # one keeps the DataLoader from drawing from, and so moving, the global generator.
    loader = DataLoader(dataset, batch_size, sampler=sampler, drop_last=drop_last,
                        num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed))
    return loader, sampler


class TorchStream:
    """One training stream: ``epoch(e, start)`` yields the batches of epoch e from step
    ``start``, on the device (pinned, non-blocking copies); ``len`` = steps per epoch."""

    def __init__(self, items: SeededItems, indices: torch.Tensor, batch_size: int, workers: int,
                 seed: int, stream: int, rank: int, world: int, device: torch.device):
        self.indices, self.batch_size, self.device = indices, batch_size, device
        self.seed, self.stream, self.rank, self.world = seed, stream, rank, world
        self.steps = steps_per_epoch(len(indices), batch_size, world)
        self.loader, self.sampler = _loader(items, batch_size, workers, device,
                                            stream_seed(seed, stream, -1), drop_last=True)

    def __len__(self) -> int:
        return self.steps

    def plan(self, epoch: int, start: int = 0) -> list[tuple[int, int]]:
        """This rank's (sample index, augmentation seed) items from step ``start`` on."""
        g = epoch_generator(self.seed, self.stream, epoch)
        n = len(self.indices)
        rows = torch.stack([self.indices[torch.randperm(n, generator=g)],
                            torch.randint(0, SEED_RANGE, (n,), generator=g)])
        index, seeds = shard(rows, self.batch_size, self.rank, self.world, self.steps, start).tolist()
        return list(zip(index, seeds))

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        check_start(start, self.steps)
        self.sampler.items = self.plan(epoch, start)
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _torch_eval(loader: DataLoader, sampler: ListSampler, items: list,
                device: torch.device) -> Callable[[], Iterator[Batch]]:
    def batches() -> Iterator[Batch]:
        sampler.items = items
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return batches


def build_torch_loaders(cfg, spec: DatasetSpec, train_idx: torch.Tensor, val_idx: torch.Tensor, *,
                        seed: int, streams: int, rank: int, world: int,
                        device: torch.device) -> Loaders:
    base_train, base_test = spec.train, spec.test
    if isinstance(base_train, ArraySplit):  # in-memory data through a DataLoader (when asked for)
        base_train, base_test = ArrayPIL(spec.train), ArrayPIL(spec.test)
    train_tf, test_tf = (imagenet_transforms if spec.style == "imagenet" else small_transforms)(
        spec, cfg.normalize, cfg.augment)
    budget = cpu_budget(cfg.num_workers)
    items = SeededItems(base_train, train_tf)
    made = [TorchStream(items, train_idx, cfg.batch_size, workers, seed, s, rank, world, device)
            for s, workers in enumerate(split_workers(budget, streams))]
    # One evaluation loader (val and test), its workers kept too; training workers idle then.
    loader, sampler = _loader(_Eval((base_train, base_test), test_tf), cfg.test_batch_size,
                              budget, device, seed, drop_last=False)
    val_fn = _torch_eval(loader, sampler, [(0, i) for i in val_idx[rank::world].tolist()],
                         device) if len(val_idx) else None
    test_fn = _torch_eval(loader, sampler, [(1, i) for i in range(rank, len(base_test), world)],
                          device)
    return Loaders(made, val_fn, test_fn, spec.num_classes, (3, spec.image_size, spec.image_size),
                   len(val_idx), len(base_test))


def imagenet_transforms(spec: DatasetSpec, normalize: bool, augment: bool):
    from torchvision import transforms as T
    size = spec.image_size
    tail = [T.ToTensor()] + ([T.Normalize(spec.mean, spec.std)] if normalize else [])
    train = ([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if augment
             else [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)])
    test = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    return T.Compose(train + tail), T.Compose(test + tail)


def small_transforms(spec: DatasetSpec, normalize: bool, augment: bool):
    from torchvision import transforms as T
    tail = [T.ToTensor()] + ([T.Normalize(spec.mean, spec.std)] if normalize else [])
    size = spec.image_size
    train = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()] if augment else []
    return T.Compose(train + tail), T.Compose(tail)


class ArrayPIL(Dataset):
    """An ArraySplit as PIL images, for data.loader=torch on small datasets."""

    def __init__(self, split: ArraySplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i):
        from torchvision.transforms.functional import to_pil_image
        return to_pil_image(self.split.images[i]), int(self.split.labels[i])
