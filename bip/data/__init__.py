"""Dataset registry: ``@register_dataset(name)`` on ``fn(cfg: DataConfig, num_classes) -> DatasetSpec``.

Small datasets (CIFAR, TinyImageNet, digits, synthetic) load fully into memory as uint8
tensors (ArraySplit) and are augmented on the device in batches; ImageNet is a torch Dataset
of PIL images read through a DataLoader, or ffcv. Nothing is ever downloaded implicitly.
"""
from __future__ import annotations

from typing import Callable

from bip.config import names
from bip.data.base import DatasetSpec
from bip.errors import BipError

DATASETS: dict[str, Callable[..., DatasetSpec]] = {}
DESCRIPTIONS: dict[str, Callable[..., DatasetSpec]] = {}


def register_dataset(name: str, describe: Callable[..., DatasetSpec] | None = None):
    """Register a reader ``fn(cfg, num_classes) -> DatasetSpec``; ``describe`` (same signature,
    no splits) answers without reading images, for loaders that bring their own (ffcv)."""
    names.listed("dataset", name)

    def wrap(fn):
        DATASETS[name] = fn
        if describe is not None:
            DESCRIPTIONS[name] = describe
        return fn
    return wrap


def _checked(cfg, num_classes: int, make) -> DatasetSpec:
    names.check_dataset(cfg.dataset)
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
