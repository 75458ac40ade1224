"""CIFAR-10/100 from the standard python pickle batches (cifar-10-batches-py, cifar-100-python)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from bip.data.base import ArraySplit, DatasetSpec
from bip.data import register_dataset
from bip.errors import BipError

_LAYOUT = {
    "CIFAR10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "CIFAR100": ("cifar-100-python", ["train"], ["test"],
                 b"fine_labels", 100, (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def find_folder(data_dir: str, name: str, folder: str) -> Path:
    """The dataset folder under data_dir, data_dir/<name> (the seed's root), or data_dir itself."""
    root = Path(data_dir)
    for candidate in (root / folder, root / name / folder, root):
        if candidate.is_dir() and candidate.name == folder:
            return candidate
    raise BipError(f"{name}: no {folder}/ under {root} or {root / name}; datasets are never "
                   "downloaded implicitly (python -m bip.data download --help)")


def _read(folder: Path, files: list[str], label_key: bytes) -> ArraySplit:
    images, labels = [], []
    for name in files:
        try:
            # The standard CIFAR distribution is a pickle; read only files the user placed.
            with open(folder / name, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
            raise BipError(f"cannot read {folder / name}: {err}") from None
    return ArraySplit(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def _cifar(name: str):
    folder_name, train_files, test_files, label_key, classes, mean, std = _LAYOUT[name]

    def load(cfg, num_classes: int = 0) -> DatasetSpec:
        folder = find_folder(cfg.data_dir, name, folder_name)
        return DatasetSpec(classes, _read(folder, train_files, label_key),
                           _read(folder, test_files, label_key), mean, std)

    def describe(cfg, num_classes: int = 0) -> DatasetSpec:
        return DatasetSpec(classes, None, None, mean, std)
    register_dataset(name, describe)(load)


_cifar("CIFAR10")
_cifar("CIFAR100")
