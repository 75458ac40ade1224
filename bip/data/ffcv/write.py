"""Writing ``.beton`` files for data.loader=ffcv (``python -m bip.data.ffcv write --help``).

Images come from the dataset's own reader in its own order (the ffcv loaders hold the
validation split out by index, so the order is what makes it the same split as the other
loaders): in-memory splits for the small datasets, the ImageFolder / LMDB Dataset for
ImageNet. The file is written under a hidden temporary name next to the output and renamed
when complete; a failed or interrupted (Ctrl-C, SIGTERM) write removes it, and a file left by
a killed write never has the output's name. Imported only once ffcv is known to import.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import tempfile
import time
from multiprocessing import Process, Queue, Value
from pathlib import Path
from queue import Empty

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.memory_allocator import MemoryAllocator
from ffcv.writer import DatasetWriter
from torch.utils.data import Dataset
from tqdm import tqdm

from bip.config import OneLineParser
from bip.data.base import ArraySplit
from bip.data import DATASETS, load_dataset
from bip.errors import BipError

SPLITS = ("train", "val", "test")  # val and test both mean the dataset's evaluation split
# ffcv-imagenet's ResNet-50 files (write_imagenet.sh 500 0.50 90): longest side 500 px, half the
# images stored as JPEG (quality 90), half raw. Small images are stored raw (exact, and tiny).
DEFAULTS = {"imagenet": (500, 0.5, 90), "small": (0, 0.0, 90)}


class _ArrayItems(Dataset):
    """An ArraySplit as (HWC uint8 array, label) items, the form ffcv's RGBImageField encodes."""

    def __init__(self, split: ArraySplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        image = self.split.images[i]
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return np.ascontiguousarray(image.permute(1, 2, 0).numpy()), int(self.split.labels[i])


def source_split(dataset: str, split: str, data_dir: str):
    """(items, style): the split as a Dataset of (image, label) and the dataset's style."""
    from bip.config import DataConfig
    if split not in SPLITS:
        raise BipError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if dataset not in DATASETS:
        raise BipError(f"unknown dataset {dataset!r}; choose one of: {', '.join(sorted(DATASETS))}")
    if not Path(data_dir).is_dir() and dataset != "synthetic":
        raise BipError(f"data dir not found: {data_dir}")
    spec = load_dataset(DataConfig(dataset=dataset, data_dir=data_dir))
    items = spec.train if split == "train" else spec.test
    return (_ArrayItems(items) if isinstance(items, ArraySplit) else items), spec.style


def write_beton(items, out: str | Path, *, max_resolution: int = 0, jpeg_fraction: float = 0.0,
                quality: int = 90, workers: int = 4, chunk_size: int = 100,
                progress: bool = True) -> Path:
    """Write ``items`` (a Dataset of (PIL image or HWC uint8 array, int label)) to ``out``,
    atomically: complete under its name, or not there at all."""
    if not 0.0 <= jpeg_fraction <= 1.0 or not 1 <= quality <= 100 or max_resolution < 0:
        raise BipError("need 0 <= jpeg fraction <= 1, 1 <= quality <= 100, max resolution >= 0")
    if len(items) == 0:
        raise BipError("nothing to write: the split is empty")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    mode = {0.0: "raw", 1.0: "jpg"}.get(jpeg_fraction, "proportion")
    fields = {"image": RGBImageField(write_mode=mode, max_resolution=max_resolution or None,
                                     jpeg_quality=quality, compress_probability=jpeg_fraction),
              "label": IntField()}
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        writer = _Writer(tmp, fields, num_workers=max(1, workers))
        writer.progress = out.name if progress else None
        writer.from_indexed_dataset(items, chunksize=chunk_size)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the rename must never expose unwritten pages
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; a dataset is shared
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _worker(work_fn, *args) -> None:
    # Ctrl-C reaches the whole process group; only the parent handles it (and stops us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    work_fn(*args)


class _Writer(DatasetWriter):
    """ffcv's DatasetWriter, except that a worker that dies (a corrupt image, a full disk)
    is an error instead of an endless wait, and the workers stop when the write does."""

    progress: str | None = None

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        self.num_samples = num_samples
        self.prepare()
        work, allocations, done = Queue(), Queue(), Value(ctypes.c_uint64, 0)
        for todo in queue_content:
            work.put(todo)
        for _ in range(self.num_workers):
            work.put(None)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done,
                allocations, *extra_worker_args)
        procs = [Process(target=_worker, args=(work_fn, *args), daemon=True)
                 for _ in range(self.num_workers)]
        try:
            for p in procs:
                p.start()
            with tqdm(total=num_samples, desc=self.progress, unit="img",
                      disable=self.progress is None) as bar:
                while done.value < num_samples:
                    _check_alive(procs)
                    bar.update(done.value - bar.n)
                    time.sleep(0.05)
                bar.update(done.value - bar.n)
            table = []
            for _ in procs:  # each worker sends its allocations once its pages are written
                while True:
                    try:
                        table.extend(allocations.get(timeout=0.5))
                        break
                    except Empty:
                        _check_alive(procs)
            self.finalize(table)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join()
            self.metadata_sm.close()
            self.metadata_sm.unlink()


def _check_alive(procs) -> None:
    failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
    if failed:
        raise BipError(f"a writer process exited with status {failed[0]} (its error is printed above)")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m bip.data.ffcv", description="Write .beton files for "
                "data.loader=ffcv (data.train_beton, data.val_beton).")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write one split of a dataset to a .beton file")
    w.add_argument("--dataset", required=True, help="ImageNet, CIFAR10, CIFAR100, TinyImageNet, ...")
    w.add_argument("--split", required=True, help="train (-> data.train_beton) or val (the "
                   "evaluation split, our test split -> data.val_beton)")
    w.add_argument("--data-dir", required=True, help="the dataset folder, as data.data_dir")
    w.add_argument("--out", required=True, help="the .beton file to write")
    w.add_argument("--max-resolution", type=int, default=None,
                   help="longest side in pixels, 0 = keep (default: 500 ImageNet, 0 small)")
    w.add_argument("--jpeg-fraction", type=float, default=None,
                   help="fraction stored as JPEG, the rest raw (default: 0.5 ImageNet, 0 small)")
    w.add_argument("--quality", type=int, default=None, help="JPEG quality (default 90)")
    w.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="writer processes")
    w.add_argument("--chunk-size", type=int, default=100, help="images per work item")
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (Slurm, kill) unwinds like Ctrl-C, so the temporary file is removed.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        args = _parser().parse_args(argv)
        items, style = source_split(args.dataset, args.split, args.data_dir)
        max_res, fraction, quality = DEFAULTS[style]
        out = write_beton(
            items, args.out,
            max_resolution=max_res if args.max_resolution is None else args.max_resolution,
            jpeg_fraction=fraction if args.jpeg_fraction is None else args.jpeg_fraction,
            quality=quality if args.quality is None else args.quality,
            workers=args.workers, chunk_size=args.chunk_size)
    except BipError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"wrote {len(items)} images to {out}", file=sys.stderr)
    return 0
