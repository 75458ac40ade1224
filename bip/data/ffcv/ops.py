"""Seeded ffcv operations: random-resized-crop decoding, horizontal flip and pad-crop whose
random draws are a pure function of (epoch key, sample index); center-crop decoding.

ffcv's own augmentations draw from numba's per-thread generators, which no seed reaches and
whose draws depend on which thread decodes which image; these make an epoch of a training
stream reproducible, so a resumed run sees exactly the batches an uninterrupted one would.
Imported only when ffcv is installed (bip.data.ffcv imports it lazily).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, SimpleRGBImageDecoder
from ffcv.libffcv import ctypes_imdecode, ctypes_memcopy, ctypes_resize
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.traversal_order.base import TraversalOrder
from numba import njit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
# One salt per operation, so the flip does not depend on the crop's draws.
CROP_SALT, FLIP_SALT, SHIFT_SALT = np.uint64(1), np.uint64(2), np.uint64(3)


class EpochKey:
    """A uint64 the compiled pipeline reads at every batch. Numba freezes arrays captured by a
    closure at compile time, so the pipeline reads this one by address: the key changes every
    epoch without recompiling (which costs seconds per pipeline)."""

    def __init__(self):
        self.box = np.zeros(1, dtype=np.uint64)

    def set(self, value: int) -> None:
        self.box[0] = np.uint64(value % 2**64)

    @property
    def address(self) -> int:
        return self.box.ctypes.data


_NO_KEY = EpochKey()  # read, and ignored, by evaluation decoders


@njit
def read_key(address):
    out = np.empty(1, dtype=np.uint64)
    ctypes_memcopy(address, out.ctypes.data, 8)
    return out[0]


@njit(cache=True)
def _mix(x):
    # splitmix64's finalizer: a bijective avalanche of 64 bits (Steele et al., 2014).
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


@njit(cache=True)
def sample_key(epoch_key, index, salt):
    return _mix(epoch_key ^ _mix(np.uint64(index) * _GOLDEN ^ salt))


@njit(cache=True)
def uniform(key, draw):
    """The draw-th uniform number in [0, 1) of a sample's key (53 random bits)."""
    bits = _mix(key + np.uint64(draw + 1) * _GOLDEN) >> np.uint64(11)
    return bits * (1.0 / 9007199254740992.0)


@njit(cache=True)
def random_crop(height, width, scale, log_ratio, key):
    """torchvision's RandomResizedCrop.get_params with keyed draws: (top, left, h, w)."""
    area = height * width
    for attempt in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * uniform(key, 4 * attempt))
        aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * uniform(key, 4 * attempt + 1))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(uniform(key, 4 * attempt + 2) * (height - h + 1))
            left = int(uniform(key, 4 * attempt + 3) * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # fallback: the whole image at the nearest allowed aspect ratio
    if in_ratio < np.exp(log_ratio[0]):
        w, h = width, int(round(width / np.exp(log_ratio[0])))
    elif in_ratio > np.exp(log_ratio[1]):
        w, h = int(round(height * np.exp(log_ratio[1]))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# The helpers shared by all loaders take only scalars (pointers, sizes): ffcv's
# OSCacheManager.state_type sets mutable=False on numba's interned uint8[::1] type, which
# changes the hash of any compiled signature holding a writable 1-D uint8 array; the next
# compile against such a signature (or numba's finalizer) then fails with a KeyError.

@njit
def decode_jpeg(data_ptr, size, buffer_ptr, height, width):
    """Decode a whole JPEG into buffer_ptr (libffcv's imdecode: no crop, no scaling)."""
    ctypes_imdecode(data_ptr, size, height, width, buffer_ptr, height, width, 0, 0, 1, 1, False, False)


@njit
def resize_crop(source_ptr, height, width, top, bottom, left, right, out_ptr, out_height, out_width):
    """Resize the region [top:bottom, left:right] of an HWC image (libffcv's, with OpenCV)."""
    ctypes_resize(0, source_ptr, height, width, top, bottom, left, right, out_ptr, out_height,
                  out_width)


@njit
def center_crop(height, width, ratio):
    side = int(ratio * min(height, width))
    return (height - side) // 2, (width - side) // 2, side, side


class CropDecoder(ResizedCropRGBImageDecoder):
    """Decode, crop and resize to ``output_size``: with a ``key``, torchvision's
    RandomResizedCrop(scale, ratio) with keyed draws (training); without, the central square
    of ``center_ratio`` x the shorter side (evaluation). ``output_size`` may change between
    epochs (progressive resizing): buffers are sized per epoch, the code does not change."""

    def __init__(self, output_size, key: EpochKey | None = None, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), center_ratio: float = 224 / 256):
        super().__init__(output_size)
        self.key, self.scale, self.ratio, self.center_ratio = key, scale, ratio, center_ratio

    @property
    def get_crop_generator(self):  # abstract in ffcv; the crop is chosen in generate_code
        return random_crop if self.key is not None else center_crop

    def generate_code(self) -> Callable:
        # ffcv's ResizedCropRGBImageDecoder.generate_code, with the crop drawn from the key.
        mem_read, my_range = self.memory_read, Compiler.get_iterator()
        jpg, keyed = IMAGE_MODES["jpg"], self.key is not None
        address = (self.key or _NO_KEY).address
        center_ratio = float(self.center_ratio)
        scale, log_ratio = np.array(self.scale, dtype=np.float64), np.log(np.array(self.ratio))

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            epoch_key = read_key(address)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = int(field["height"]), int(field["width"])
                source = image_data.ctypes.data
                if field["mode"] == jpg:
                    source = temp_storage[dst_ix].ctypes.data
                    decode_jpeg(image_data.ctypes.data, image_data.size, source, height, width)
                if keyed:
                    top, left, h, w = random_crop(height, width, scale, log_ratio,
                                                  sample_key(epoch_key, source_ix, CROP_SALT))
                else:
                    top, left, h, w = center_crop(height, width, center_ratio)
                out = destination[dst_ix]
                resize_crop(source, height, width, top, top + h, left, left + w, out.ctypes.data,
                            out.shape[0], out.shape[1])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class FullDecoder(SimpleRGBImageDecoder):
    """The whole image, for files whose images all have one size (ffcv's
    SimpleRGBImageDecoder, through the shared helpers)."""

    def generate_code(self) -> Callable:
        mem_read, my_range, jpg = self.memory_read, Compiler.get_iterator(), IMAGE_MODES["jpg"]

        def decode(batch_indices, destination, metadata, storage_state):
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                out = destination[dst_ix]
                if field["mode"] == jpg:
                    decode_jpeg(image_data.ctypes.data, image_data.size, out.ctypes.data,
                                int(field["height"]), int(field["width"]))
                else:
                    copy_bytes(image_data.ctypes.data, out.ctypes.data, image_data.size)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


@njit
def copy_bytes(source_ptr, out_ptr, size):
    ctypes_memcopy(source_ptr, out_ptr, size)


class _KeyedImageOp(Operation):
    """A jitted uint8 HWC -> same-shape operation that receives the batch's sample indices."""

    def __init__(self, key: EpochKey):
        super().__init__()
        self.key = key

    def declare_state_and_memory(self, previous_state):
        return (replace(previous_state, jit_mode=True),
                AllocationQuery(previous_state.shape, previous_state.dtype))


class SeededFlip(_KeyedImageOp):
    """Horizontal flip with probability 1/2 per sample."""

    def generate_code(self) -> Callable:
        my_range, address = Compiler.get_iterator(), self.key.address

        def flip(images, dst, indices):
            epoch_key = read_key(address)
            for i in my_range(len(indices)):
                if uniform(sample_key(epoch_key, indices[i], FLIP_SALT), 0) < 0.5:
                    dst[i] = images[i, :, ::-1]
                else:
                    dst[i] = images[i]
            return dst[:len(indices)]

        flip.is_parallel, flip.with_indices = True, True
        return flip


class SeededPadCrop(_KeyedImageOp):
    """torchvision's RandomCrop(size, padding=pad): shift by up to ``pad`` pixels, black fill."""

    def __init__(self, key: EpochKey, pad: int = 4):
        super().__init__(key)
        self.pad = pad

    def generate_code(self) -> Callable:
        my_range, address, pad = Compiler.get_iterator(), self.key.address, self.pad

        def pad_crop(images, dst, indices):
            epoch_key = read_key(address)
            h, w = images.shape[1], images.shape[2]
            for i in my_range(len(indices)):
                key = sample_key(epoch_key, indices[i], SHIFT_SALT)
                dy = int(uniform(key, 0) * (2 * pad + 1)) - pad
                dx = int(uniform(key, 1) * (2 * pad + 1)) - pad
                dst[i] = 0
                r0, r1, c0, c1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
                dst[i, r0:r1, c0:c1] = images[i, r0 + dy:r1 + dy, c0 + dx:c1 + dx]
            return dst[:len(indices)]

        pad_crop.is_parallel, pad_crop.with_indices = True, True
        return pad_crop


class PlannedOrder(TraversalOrder):
    """An ffcv traversal order that reads each epoch's sample ids from ``plan(epoch)`` (the
    stream's shard of bip.data.plan, possibly starting mid-epoch). ffcv 1.0.2's Loader calls
    a TraversalOrder instance with itself (``order(self)``): that call binds the loader."""

    def __init__(self, plan: Callable[[int], np.ndarray]):  # no loader yet: see __call__
        self.plan, self.loader, self.sampler = plan, None, None

    def __call__(self, loader) -> "PlannedOrder":
        self.loader, self.indices, self.seed = loader, loader.indices, loader.seed
        self.distributed = loader.distributed
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.plan(epoch)
