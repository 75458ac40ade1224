"""The types every data backend shares: datasets (ArraySplit, DatasetSpec), what the loop reads
(Batch, Loaders) and the held-out validation split. Backends import this module, never each
other; bip.data.loaders picks one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch
from torch.utils.data import Dataset

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArraySplit:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __post_init__(self):
        assert self.images.dtype == torch.uint8 and self.images.dim() == 4
        assert self.labels.dtype == torch.int64 and len(self.labels) == len(self.images)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ArraySplit":
        return ArraySplit(self.images[index], self.labels[index])


Split = Union[ArraySplit, Dataset]  # a Dataset yields (PIL image, int label)


@dataclass(frozen=True)
class DatasetSpec:
    num_classes: int
    train: Split | None  # None: described only (describe_dataset), no images read
    test: Split | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    style: str = "small"      # small: pad-4 crop + flip | imagenet: random-resized crop + flip
    image_size: int = 32      # train/eval resolution


Batch = tuple[torch.Tensor, torch.Tensor]


def split_indices(n: int, val_fraction: float, split_seed: int, data_fraction: float = 1.0):
    """(train, val) index tensors: a fixed random held-out slice, then an optional subsample."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_val = int(round(n * val_fraction))
    val, train = order[:n_val], order[n_val:]
    train = train[: max(1, int(round(len(train) * data_fraction)))]
    return train.sort().values, val.sort().values


@dataclass
class Loaders:
    """What the training loop reads: ``streams[i].epoch(e, start=k)`` batches, eval callables.
    ``global_batch`` = data.batch_size x world size: what a step means for the result."""

    streams: list  # TensorStream | TorchStream | FfcvStream, one per training stream
    val: Callable[[], Iterable[Batch]] | None
    test: Callable[[], Iterable[Batch]]
    num_classes: int
    input_shape: tuple[int, int, int]
    val_size: int
    test_size: int
    global_batch: int = 0
    world: int = 1
