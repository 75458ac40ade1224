"""ImageNet as an ImageFolder tree (train/, val/) or as the seed's LMDB files (train.lmdb,
val.lmdb: pickled (jpeg bytes, label) records plus __keys__ / __len__). Items are PIL images;
the loaders add the random-resized-crop / center-crop transforms."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from bip.data import IMAGENET_MEAN, IMAGENET_STD, DatasetSpec, register_dataset
from bip.errors import BipError


class LmdbImages(Dataset):
    """The seed's ImageNet LMDB. The environment opens lazily, once per worker process."""

    def __init__(self, path: Path):
        try:
            import lmdb
        except ImportError:
            raise BipError("ImageNet LMDB files need the lmdb package: pip install -e '.[lmdb]'") from None
        self.path, self.env = path, None
        env = lmdb.open(str(path), subdir=path.is_dir(), readonly=True, lock=False, readahead=False)
        with env.begin() as txn:
            self.keys = pickle.loads(txn.get(b"__keys__"))
        env.close()

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        if self.env is None:
            import lmdb
            self.env = lmdb.open(str(self.path), subdir=self.path.is_dir(), readonly=True,
                                 lock=False, readahead=False)
        with self.env.begin() as txn:
            jpeg, label = pickle.loads(txn.get(self.keys[i]))
        return Image.open(io.BytesIO(jpeg)).convert("RGB"), int(label)


def _splits(root: Path):
    if (root / "train.lmdb").exists() and (root / "val.lmdb").exists():
        return LmdbImages(root / "train.lmdb"), LmdbImages(root / "val.lmdb")
    if (root / "train").is_dir() and (root / "val").is_dir():
        return ImageFolder(str(root / "train")), ImageFolder(str(root / "val"))
    raise BipError(f"ImageNet: {root} has neither train.lmdb + val.lmdb nor train/ + val/ class "
                   "folders; datasets are never downloaded implicitly")


def _imagenet(cfg, num_classes: int = 0) -> DatasetSpec:
    train, test = _splits(Path(cfg.data_dir))
    classes = len(train.classes) if isinstance(train, ImageFolder) else 1000
    return DatasetSpec(classes, train, test, IMAGENET_MEAN, IMAGENET_STD, style="imagenet",
                       image_size=cfg.image_size or 224)


def _describe(cfg, num_classes: int = 0) -> DatasetSpec:
    return DatasetSpec(num_classes or 1000, None, None, IMAGENET_MEAN, IMAGENET_STD,
                       style="imagenet", image_size=cfg.image_size or 224)


register_dataset("ImageNet", _describe)(_imagenet)
register_dataset("ImageNetOrigin", _describe)(_imagenet)  # the seed's name for the ImageFolder layout
