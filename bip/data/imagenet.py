"""ImageNet as an ImageFolder tree (train/, val/) or as the seed's LMDB files (train.lmdb,
val.lmdb: pickled (jpeg bytes, label) records plus __keys__ / __len__). Items are PIL images;
the loaders add the random-resized-crop / center-crop transforms.

LMDB input must come from a source you trust: its records are pickles, and unpickling a crafted
pickle runs code. They are read with a restricted unpickler (``_PlainData``) that builds plain
data only (tuples, lists, bytes, str, numbers) and refuses any pickle that names a Python object,
which is how a crafted pickle runs code; a malformed or huge record can still fail or exhaust
memory. The safe route: convert the images once with ``python -m bip.data.ffcv write`` and train
from the ``.beton`` files (data.loader=ffcv), which hold no pickles.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from bip.data.base import IMAGENET_MEAN, IMAGENET_STD, DatasetSpec
from bip.data import register_dataset
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
            self.keys = _load(txn.get(b"__keys__"), path, "__keys__")
        env.close()
        if not isinstance(self.keys, list) or not all(isinstance(k, bytes) for k in self.keys):
            raise BipError(f"{path}: __keys__ is not a list of byte strings; {_TRUST}")

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        if self.env is None:
            import lmdb
            self.env = lmdb.open(str(self.path), subdir=self.path.is_dir(), readonly=True,
                                 lock=False, readahead=False)
        with self.env.begin() as txn:
            record = _load(txn.get(self.keys[i]), self.path, f"record {self.keys[i]!r}")
        if not (isinstance(record, tuple) and len(record) == 2 and isinstance(record[0], bytes)
                and isinstance(record[1], int)):
            raise BipError(f"{self.path}: record {self.keys[i]!r} is not (jpeg bytes, label); {_TRUST}")
        return Image.open(io.BytesIO(record[0])).convert("RGB"), record[1]


_TRUST = ("LMDB input is pickled and must come from a source you trust; the safe route is "
          "`python -m bip.data.ffcv write --dataset ImageNet ...` once, then data.loader=ffcv")


class _PlainData(pickle.Unpickler):
    """Unpickles plain data only: every global (class, function) is refused, so no pickle can
    make it call anything."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused to load the Python object {module}.{name}")


def _load(buf: bytes | None, path: Path, what: str):
    if buf is None:
        raise BipError(f"{path}: no {what} entry (not the seed's LMDB format)")
    try:
        return _PlainData(io.BytesIO(buf)).load()
    except Exception as err:  # any unpickling failure is the file's, reported in one line
        raise BipError(f"{path}: {what} is not plain pickled data ({type(err).__name__}: {err}); "
                       f"{_TRUST}") from None


def _splits(root: Path):
    if (root / "train.lmdb").exists() and (root / "val.lmdb").exists():
        return LmdbImages(root / "train.lmdb"), LmdbImages(root / "val.lmdb")
    if (root / "train").is_dir() and (root / "val").is_dir():
        # Imported here: torchvision.datasets pulls in torchvision.models and torch._dynamo
        # (~1.5 s), which every run of every other dataset would pay at start-up.
        from torchvision.datasets import ImageFolder
        return ImageFolder(str(root / "train")), ImageFolder(str(root / "val"))
    raise BipError(f"ImageNet: {root} has neither train.lmdb + val.lmdb nor train/ + val/ class "
                   "folders; datasets are never downloaded implicitly")


def _imagenet(cfg, num_classes: int = 0) -> DatasetSpec:
    train, test = _splits(Path(cfg.data_dir))
    classes = 1000 if isinstance(train, LmdbImages) else len(train.classes)
    return DatasetSpec(classes, train, test, IMAGENET_MEAN, IMAGENET_STD, style="imagenet",
                       image_size=cfg.image_size or 224)


def _describe(cfg, num_classes: int = 0) -> DatasetSpec:
    return DatasetSpec(num_classes or 1000, None, None, IMAGENET_MEAN, IMAGENET_STD,
                       style="imagenet", image_size=cfg.image_size or 224)


register_dataset("ImageNet", _describe)(_imagenet)
register_dataset("ImageNetOrigin", _describe)(_imagenet)  # the seed's name for the ImageFolder layout
