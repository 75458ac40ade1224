"""TinyImageNet from the standard ``tiny-imagenet-200`` folder, read without modifying it.

Classes are the sorted wnids of train/ (ImageFolder order, as the reference); the test split
is the official val set (10,000 images) labelled from val/val_annotations.txt. All 110k 64x64
JPEGs are decoded into memory once per run (a thread pool; about 0.8 GB as uint8).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bip.data.base import IMAGENET_MEAN, IMAGENET_STD, ArraySplit, DatasetSpec
from bip.data import register_dataset
from bip.errors import BipError

FOLDER = "tiny-imagenet-200"


def _folder(data_dir: str) -> Path:
    root = Path(data_dir)
    for candidate in (root, root / FOLDER):
        if (candidate / "train").is_dir() and (candidate / "val" / "val_annotations.txt").is_file():
            return candidate
    raise BipError(f"TinyImageNet: {root} is not an unmodified {FOLDER} folder (need train/ and "
                   "val/val_annotations.txt); datasets are never downloaded implicitly")


def _decode(paths: list[Path], workers: int) -> torch.Tensor:
    def one(path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as image:
                return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        except OSError as err:
            raise BipError(f"cannot decode {path}: {err}") from None
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return torch.stack(list(pool.map(one, paths, chunksize=256)))


def _describe(cfg, num_classes: int = 0) -> DatasetSpec:
    return DatasetSpec(200, None, None, IMAGENET_MEAN, IMAGENET_STD, image_size=64)


@register_dataset("TinyImageNet", _describe)
def tiny_imagenet(cfg, num_classes: int = 0) -> DatasetSpec:
    root = _folder(cfg.data_dir)
    wnids = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = [], []
    for wnid in wnids:
        files = sorted((root / "train" / wnid / "images").glob("*.JPEG"))
        train_paths += files
        train_labels += [index[wnid]] * len(files)
    test_paths, test_labels = [], []
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise BipError(f"TinyImageNet: unexpected line in val_annotations.txt: {line!r}")
        test_paths.append(root / "val" / "images" / parts[0])
        test_labels.append(index[parts[1]])
    workers = max(cfg.num_workers, 1) * 2
    train = ArraySplit(_decode(train_paths, workers), torch.tensor(train_labels, dtype=torch.int64))
    test = ArraySplit(_decode(test_paths, workers), torch.tensor(test_labels, dtype=torch.int64))
    return DatasetSpec(len(wnids), train, test, IMAGENET_MEAN, IMAGENET_STD, image_size=64)
