"""Dataset registry: ``@register_dataset(name)`` on ``fn(cfg: DataConfig, num_classes) -> DatasetSpec``.

Small datasets (CIFAR, TinyImageNet, digits, synthetic) load fully into memory as uint8
tensors (ArraySplit) and are augmented on the device in batches; ImageNet is a torch Dataset
of PIL images read through a DataLoader, or ffcv. Nothing is ever downloaded implicitly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch.utils.data import Dataset

from bip import catalogue
from bip.errors import BipError

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


DATASETS: dict[str, Callable[..., DatasetSpec]] = {}
DESCRIPTIONS: dict[str, Callable[..., DatasetSpec]] = {}


def register_dataset(name: str, describe: Callable[..., DatasetSpec] | None = None):
    """Register a reader ``fn(cfg, num_classes) -> DatasetSpec``; ``describe`` (same signature,
    no splits) answers without reading images, for loaders that bring their own (ffcv)."""
    catalogue.listed("dataset", name)

    def wrap(fn):
        DATASETS[name] = fn
        if describe is not None:
            DESCRIPTIONS[name] = describe
        return fn
    return wrap


def check_dataset(name: str) -> None:
    """A registered dataset name, or a one-line BipError listing the choices."""
    if name not in DATASETS:
        raise BipError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")


def _checked(cfg, num_classes: int, make) -> DatasetSpec:
    check_dataset(cfg.dataset)
    spec = make(cfg, num_classes)
    if num_classes and num_classes != spec.num_classes:
        raise BipError(f"model.num_classes={num_classes} but {cfg.dataset} has {spec.num_classes} classes")
    return spec


def load_dataset(cfg, num_classes: int = 0) -> DatasetSpec:
    """The dataset named by ``cfg.dataset`` (``num_classes`` only shapes ``synthetic``)."""
    return _checked(cfg, num_classes, lambda c, n: DATASETS[c.dataset](c, n))


def describe_dataset(cfg, num_classes: int = 0) -> DatasetSpec:
    """Classes, mean/std, augmentation style and size without reading any image (splits are
    None): with data.loader=ffcv the node needs only the .beton files. Datasets without a
    description are small and simply loaded."""
    return _checked(cfg, num_classes, lambda c, n: DESCRIPTIONS.get(c.dataset, DATASETS[c.dataset])(c, n))


# The readers register themselves on import; this list is the whole catalogue.
from bip.data import cifar, demo, imagenet, synthetic, tiny_imagenet  # noqa: E402,F401
