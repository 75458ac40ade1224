"""ffcv loaders (data.loader=ffcv): JIT-compiled decoding and augmentation from .beton files.

``data.train_beton`` holds the dataset's training split; our validation split is held out of
it by index (bip.data.base.split_indices: the same images as with every other loader).
``data.val_beton`` holds the dataset's evaluation split (ImageNet val), our test split. Write
both with ``python -m bip.data.ffcv write --help``.

ImageNet-style data follows the ffcv ImageNet recipe: random-resized-crop decoding and flip,
optionally progressive resizing (data.min_res -> data.image_size over epochs data.start_ramp
-> data.end_ramp), center-crop (224/256) evaluation. Small datasets get pad-4 crop + flip.

data.batch_size is PER PROCESS: under DDP with N GPUs the global batch is batch_size x N (as
ffcv-imagenet's training.batch_size). Training streams read the order of bip.data.plan (the same
as the other loaders: the global epoch's permutation drawn from (seed, stream, epoch), each rank
taking its interleaved shard of every global batch) through a custom ffcv traversal order
instead of ffcv's DistributedSampler (whose permutation, padding and shards depend on N). Eval
loaders read the disjoint shards rank::N, in order and without dropping, so each image is
counted once.

Each training stream is reproducible per (seed, stream, epoch) and invariant to N: the order
is the plan's, and the augmentation draws are keyed by stream_seed(seed, stream, epoch) and the
sample index (bip.data.ffcv.ops), whichever thread, rank or world size decodes the sample. An
epoch can start at any step (``epoch(e, start=k)``): the epoch's index list then starts at the
k-th batch; nothing before it is read or decoded.

On CPU, NormalizeImage runs before ToTensor (in ffcv's GPU order the Loader hangs on CPU). On
GPU, uint8 images are copied to the device and normalised there (ffcv-imagenet's fast order,
in torch rather than through cupy).
"""
from __future__ import annotations

import importlib
from contextlib import closing
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from bip.data.base import Batch, DatasetSpec, Loaders, split_indices
from bip.data.plan import (check_start, cpu_budget, epoch_generator, shard, split_workers, steps_per_epoch,
                           stream_seed)
from bip.errors import BipError

INSTALL_HINT = ("data.loader=ffcv needs the ffcv extra: pip install -e '.[ffcv]' "
                "(system packages: see README)")
EVAL_CROP_RATIO = 224 / 256  # center crop of the shorter side, as Resize(256) + CenterCrop(224)


def require_ffcv() -> None:
    """Import ffcv or raise the one-line install hint."""
    try:
        import ffcv  # noqa: F401
    except (ImportError, OSError) as err:  # OSError: a system library (libturbojpeg) is missing
        raise BipError(f"{INSTALL_HINT}; import ffcv failed: {err}") from None


def build_ffcv_loaders(cfg, spec: DatasetSpec, *, seed: int, streams: int, rank: int, world: int,
                       device: torch.device) -> Loaders:
    """Loaders over ``cfg.train_beton`` / ``cfg.val_beton`` with the contract of build_loaders."""
    require_ffcv()
    torch_threads = torch.get_num_threads()  # ffcv's Loader sets it to its own thread count
    train_file = check_beton(cfg.train_beton, "data.train_beton", spec.train, spec.num_classes)
    test_file = check_beton(cfg.val_beton, "data.val_beton", spec.test, spec.num_classes)
    n_train = len(train_file.metadata)
    train_idx, val_idx = split_indices(n_train, cfg.val_fraction, cfg.split_seed, cfg.data_fraction)
    workers = _threads(cpu_budget(cfg.num_workers))
    mean, std = (spec.mean, spec.std) if cfg.normalize else ((0.0,) * 3, (1.0,) * 3)
    tail, finish = _tail(mean, std, device)
    if spec.style == "imagenet":
        size = spec.image_size
        if cfg.min_res > size:
            raise BipError(f"data.min_res={cfg.min_res} exceeds the resolution {size}")
        shape = (3, size, size)
    else:
        size = 0
        shape = (3, *_constant_size(train_file, cfg.train_beton))
    # The training streams decode at the same time: they share the threads.
    made = [FfcvStream(cfg, spec.style, size, train_idx.numpy(), max(1, threads), tail, finish,
                       seed, s, rank, world, device)
            for s, threads in enumerate(split_workers(workers, streams))]
    eval_ops = _eval_ops(spec.style, size)
    val_fn = _eval(cfg.train_beton, val_idx.numpy()[rank::world], cfg.test_batch_size, workers,
                   eval_ops + tail, finish, device) if len(val_idx) else None
    test_fn = _eval(cfg.val_beton, np.arange(len(test_file.metadata))[rank::world],
                    cfg.test_batch_size, workers, eval_ops + tail, finish, device)
    torch.set_num_threads(torch_threads)
    return Loaders(made, val_fn, test_fn, spec.num_classes, shape, len(val_idx),
                   len(test_file.metadata))


class FfcvStream:
    """One training stream: ``epoch(e, start)`` yields the full batches of epoch e from step
    ``start`` on the device; ``len`` = steps per epoch."""

    def __init__(self, cfg, style: str, size: int, indices: np.ndarray, workers: int, tail: list,
                 finish: Callable, seed: int, stream: int, rank: int, world: int,
                 device: torch.device):
        from ffcv.loader import Loader

        from bip.data.ffcv.ops import (CropDecoder, EpochKey, FullDecoder, PlannedOrder, SeededFlip,
                                       SeededPadCrop)
        self.cfg, self.size, self.seed, self.stream, self.finish = cfg, size, seed, stream, finish
        self.rank, self.world, self.indices = rank, world, torch.from_numpy(indices.astype(np.int64))
        self.steps = steps_per_epoch(len(indices), cfg.batch_size, world)
        self.key, self.decoder, self.start = EpochKey(), None, 0
        if style == "imagenet" and cfg.augment:
            self.decoder = CropDecoder((size, size), self.key)
            ops = [self.decoder, SeededFlip(self.key)]
        elif style == "imagenet":
            ops = _eval_ops(style, size)
        else:
            augment = [SeededPadCrop(self.key), SeededFlip(self.key)] if cfg.augment else []
            ops = [FullDecoder()] + augment
        # ffcv reads the order (the list of this epoch's sample ids) from self.plan: the same
        # for every world size, sharded here, without torch.distributed.
        self.loader = Loader(cfg.train_beton, cfg.batch_size, num_workers=workers, os_cache=True,
                             order=PlannedOrder(lambda epoch: self.plan(epoch, self.start)),
                             indices=indices, drop_last=True,
                             pipelines={"image": ops + tail, "label": _label_ops(device)})

    def plan(self, epoch: int, start: int = 0) -> np.ndarray:
        """This rank's sample ids of ``epoch`` from step ``start`` (bip.data.plan)."""
        g = epoch_generator(self.seed, self.stream, epoch)
        order = self.indices[torch.randperm(len(self.indices), generator=g)]
        return shard(order, self.cfg.batch_size, self.rank, self.world, self.steps, start).numpy()

    def __len__(self) -> int:
        return self.steps

    def resolution(self, epoch: int) -> int:
        """The training resolution of ``epoch`` (ffcv-imagenet's progressive resizing)."""
        cfg, size = self.cfg, self.size
        if not cfg.min_res or epoch >= cfg.end_ramp:
            return size
        if epoch <= cfg.start_ramp:
            return cfg.min_res
        res = np.interp(epoch, [cfg.start_ramp, cfg.end_ramp], [cfg.min_res, size])
        return int(min(size, max(cfg.min_res, round(res / 32) * 32)))  # multiples of 32, as there

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        check_start(start, self.steps)
        if start == self.steps:
            return
        self.key.set(stream_seed(self.seed, self.stream, epoch))
        if self.decoder is not None:  # buffers are sized per epoch, so this needs no recompile
            res = self.resolution(epoch)
            self.decoder.output_size = (res, res)
        self.loader.next_epoch, self.start = epoch, start  # read by the order at iter()
        with closing(_iterate(self.loader)) as batches:  # stops ffcv's thread on an early exit
            for x, y in batches:
                yield self.finish(x), y


def _iterate(loader) -> Iterator:
    """Iterate an ffcv Loader. A pipeline error kills ffcv's thread (its traceback is printed)
    and its iterator then waits forever; this raises instead. ffcv also sets torch's CPU
    thread count to its own (in __iter__ and again in its thread): put it back once the first
    batch shows that its thread has started."""
    torch_threads = torch.get_num_threads()
    batches = iter(loader)
    queue = batches.output_queue
    try:
        while True:
            with queue.not_empty:  # queue.qsize() would take this same lock again
                while not queue._qsize():
                    if not batches.is_alive():
                        raise BipError("the ffcv loader's thread stopped on an error (printed above)")
                    queue.not_empty.wait(0.5)
            try:
                batch = next(batches)
            except StopIteration:
                return
            torch.set_num_threads(torch_threads)
            yield batch
    finally:
        batches.close()
        torch.set_num_threads(torch_threads)


def _eval(path: str, indices: np.ndarray, batch_size: int, workers: int, image_ops: list,
          finish: Callable, device: torch.device) -> Callable[[], Iterator[Batch]]:
    """Sequential, undropped batches of this rank's shard; the Loader (and its compiled
    pipeline) is built once and iterated at every evaluation."""
    from ffcv.loader import Loader, OrderOption
    if len(indices) == 0:
        return lambda: iter(())
    loader = Loader(path, batch_size, num_workers=workers, os_cache=True,
                    order=OrderOption.SEQUENTIAL, indices=indices, drop_last=False,
                    pipelines={"image": image_ops, "label": _label_ops(device)})

    def batches() -> Iterator[Batch]:
        with closing(_iterate(loader)) as items:
            for x, y in items:
                yield finish(x), y
    return batches


def _eval_ops(style: str, size: int) -> list:
    from bip.data.ffcv.ops import CropDecoder, FullDecoder
    if style == "imagenet":
        return [CropDecoder((size, size), center_ratio=EVAL_CROP_RATIO)]
    return [FullDecoder()]


def _tail(mean, std, device: torch.device) -> tuple[list, Callable]:
    """The ops after decoding/augmenting (uint8 HWC) and what finishes a batch in torch."""
    from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage
    mean255, std255 = np.array(mean) * 255, np.array(std) * 255
    if device.type != "cuda":
        # On CPU: normalise in the compiled stage, then a channels-last NCHW float32 view.
        return ([NormalizeImage(mean255, std255, np.float32), ToTensor(), ToTorchImage()],
                lambda x: x)
    m = torch.tensor(mean255, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std255, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    # On GPU: a uint8 copy (4x less than float32) and normalisation on the device.
    return ([ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage()],
            lambda x: (x.float() - m) / s)


def _label_ops(device: torch.device) -> list:
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor
    ops = [IntDecoder(), ToTensor(), Squeeze(1)]
    return ops + ([ToDevice(device, non_blocking=True)] if device.type == "cuda" else [])


def _threads(num_workers: int) -> int:
    """ffcv decodes with numba threads (data.num_workers of them, at most the cores numba
    sees). Two training streams and the eval loaders run their compiled stages from
    different threads at once, which only the tbb and omp layers allow."""
    import numba
    if numba.config.THREADING_LAYER == "default":
        for layer in ("tbbpool", "omppool"):
            try:
                importlib.import_module(f"numba.np.ufunc.{layer}")
                numba.config.THREADING_LAYER = "threadsafe"
                break
            except ImportError:
                continue
        else:
            return 1  # only numba's workqueue layer: serial pipelines, never in parallel
    return max(1, min(num_workers, numba.config.NUMBA_NUM_THREADS))


def check_beton(path: str, key: str, split=None, num_classes: int = 0):
    """The ffcv Reader of a complete .beton with an image and a label field, consistent with
    the dataset split it stands for; anything else is a one-line BipError."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType
    if not path:
        raise BipError(f"data.loader=ffcv needs {key} (write it: python -m bip.data.ffcv write --help)")
    file = Path(path)
    if not file.is_file():
        raise BipError(f"{key} not found: {path}")
    size = file.stat().st_size
    header = np.fromfile(file, dtype=HeaderType, count=1)
    # A write that stopped early has no allocation table yet (its pointer is 0) or a
    # truncated one.
    table_ptr = int(header["alloc_table_ptr"][0]) if len(header) else 0
    if (not len(header) or header["version"][0] != CURRENT_VERSION or table_ptr == 0
            or table_ptr > size or (size - table_ptr) % ALLOC_TABLE_TYPE.itemsize):
        raise BipError(f"{key}={path} is not a complete .beton file (an interrupted write?); rewrite it")
    reader = Reader(str(file))
    if not (isinstance(reader.handlers.get("image"), RGBImageField)
            and isinstance(reader.handlers.get("label"), IntField)):
        raise BipError(f"{key}={path} must have an 'image' (RGB) and a 'label' (int) field; "
                       f"it has {', '.join(reader.handlers)}")
    ends = reader.alloc_table["ptr"] + reader.alloc_table["size"]
    if (ends > table_ptr).any() or len(np.unique(reader.alloc_table["sample_id"])) != reader.num_samples:
        raise BipError(f"{key}={path} is not a complete .beton file (an interrupted write?); rewrite it")
    labels = reader.metadata[f"f{reader.field_names.index('label')}"]
    known = getattr(split, "labels", getattr(split, "targets", None))
    if split is not None and len(split) != reader.num_samples:
        raise BipError(f"{key}={path} has {reader.num_samples} images but the dataset split has "
                       f"{len(split)}: write it from data.data_dir")
    if known is not None and not np.array_equal(np.asarray(known), labels):
        raise BipError(f"{key}={path} does not hold the dataset split in its order (labels differ)")
    if num_classes and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise BipError(f"{key}={path} has labels outside [0, {num_classes})")
    return reader


def _constant_size(reader, path: str) -> tuple[int, int]:
    meta = reader.metadata[f"f{reader.field_names.index('image')}"]
    heights, widths = np.unique(meta["height"]), np.unique(meta["width"])
    if len(heights) != 1 or len(widths) != 1:
        raise BipError(f"{path}: small-image pipelines need images of one size; got several")
    return int(heights[0]), int(widths[0])
