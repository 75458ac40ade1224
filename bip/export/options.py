"""The options of an export, checked before anything is written: one copy for
``python -m bip.export`` (bip.export.run) and a grid's ``stages.export`` (launch/gridfile.py).

No torch here (nor in bip/export/__init__.py): the launcher validates a grid's export options at
``--dry-run`` without importing torch. Whether a CUDA device exists is asked in bip.export.run.
"""
from __future__ import annotations

import math
import re
from typing import Callable

from bip.errors import BipError

# option -> type. ``input_size`` 0 / None: the run's dataset resolution.
TYPES = {"thin": bool, "onnx": bool, "latency": list, "nm_sparse": bool, "input_size": int,
         "device": str}
# A grid's defaults (a cell exports thinned models and their latency at batch 64).
GRID_DEFAULTS = {"thin": True, "onnx": False, "latency": [64], "nm_sparse": False, "input_size": 0}
# Upper bounds that keep a typo from allocating terabytes: the largest latency batch (also the
# dynamic batch bound of thin.pt2), the largest input side, and the largest input batch of a
# latency measurement in bytes (float32; 4096 ImageNet images at 224 px are 2.5 GB).
MAX_BATCH = 4096
MAX_INPUT_SIZE = 4096
MAX_INPUT_BYTES = 4 * 2**30
DEVICE = re.compile(r"cpu|cuda(:\d+)?")
NM_LAYER_TYPE = "nm"
THIN_LAYER_TYPES = ("filter", "channel")


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(options: dict, name: Callable[[str], str], where: str = "") -> None:
    """Raise a one-line BipError for the first bad option. ``options``: any of TYPES' keys
    (missing ones are not checked); ``name(key)`` spells an option in the caller's terms
    (``--input-size``, ``stages.export.input_size``), ``where`` starts each message."""
    try:
        _check(options, name)
    except BipError as err:
        raise BipError(f"{where}{err}") from None


def _check(options: dict, name: Callable[[str], str]) -> None:
    for key, kind in TYPES.items():
        if key not in options or (key in ("input_size", "device") and options[key] is None):
            continue
        value = options[key]
        ok = _int(value) if kind is int else isinstance(value, kind)
        if kind is list:
            ok = ok and all(_int(b) for b in value)
        if not ok:
            what = "a list of batch sizes" if kind is list else kind.__name__
            raise BipError(f"{name(key)} must be {what}, got {value!r}")
    for batch in options.get("latency") or ():
        if not 1 <= batch <= MAX_BATCH:
            raise BipError(f"{name('latency')}: batch size {batch} is out of range [1, {MAX_BATCH}]")
    size = options.get("input_size")
    if size and not 1 <= size <= MAX_INPUT_SIZE:  # 0 / None: the dataset's resolution
        raise BipError(f"{name('input_size')}={size} is out of range [1, {MAX_INPUT_SIZE}]")
    if options.get("onnx") and not options.get("thin"):
        raise BipError(f"{name('onnx')} needs {name('thin')} (the ONNX file is of the thinned model)")
    device = options.get("device")
    if device is not None and not DEVICE.fullmatch(device):
        raise BipError(f"{name('device')}={device!r} is not a device; use cpu, cuda or cuda:N")


def check_input(shape: tuple[int, ...], latency, name: Callable[[str], str]) -> None:
    """The largest latency batch of ``shape`` inputs must fit in MAX_INPUT_BYTES (float32)."""
    if not latency:
        return
    size = 4 * max(latency) * math.prod(shape)
    if size > MAX_INPUT_BYTES:
        raise BipError(f"{name('latency')}: a batch of {max(latency)} inputs of shape "
                       f"{'x'.join(map(str, shape))} is {size / 2**30:.1f} GiB (at most "
                       f"{MAX_INPUT_BYTES // 2**30} GiB); use a smaller batch or input size")
