"""Checkpoints that resume exactly, and reading source models.

Checkpoints are written atomically (bip.rundir.atomic) and hold only tensors and plain containers,
so they load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import pickle
import random
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from bip.rundir.atomic import atomic_write
from bip.errors import BipError

FORMAT = "bip-checkpoint-2"  # step and epoch checkpoints (bip.train.state reads 1 and 2)
CHECKPOINT_FORMATS = (FORMAT, "bip-checkpoint-1")
FINAL_FORMAT = "bip-final-1"  # final.pt: model + masks + meta, no training state


def save(path: Path, obj: dict) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load(path: str | Path, what: str = "checkpoint") -> dict:
    """torch.load(weights_only=True) with one-line errors for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise BipError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 129": the error says it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as err:
        raise BipError(f"{what} {path} is corrupt or not a torch checkpoint "
                       f"({type(err).__name__})") from None
    if not isinstance(obj, dict):
        raise BipError(f"{what} {path} does not hold a state dict")
    return obj


def source_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state_dict, meta) of a model to start from: our checkpoint, the reference
    code's checkpoint ({'state_dict': ...}), a bare state_dict (what torch.hub caches for
    torchvision), or a .safetensors file (timm's hub files)."""
    if Path(path).suffix == ".safetensors":
        return _safetensors(Path(path)), {}
    obj = load(path, "source checkpoint")
    ours = obj.get("format") in (*CHECKPOINT_FORMATS, FINAL_FORMAT)
    state = obj.get("model") if ours else obj.get("state_dict", obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BipError(f"source checkpoint {path} holds no model state_dict"
                       + (" (its 'model' entry is missing or not a dict of tensors)" if ours else ""))
    if ours:
        meta = obj.get("meta", {})
        return state, meta if isinstance(meta, dict) else {}
    # DataParallel / DDP prefixes from other tools.
    return {k.removeprefix("module."): v for k, v in state.items()}, {}


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BipError(f"source checkpoint not found: {path}")
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise BipError(f"{path}: reading .safetensors needs the safetensors package "
                       "(pip install 'bip[timm]')") from None
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise BipError(f"source checkpoint {path} is corrupt or not a safetensors file "
                       f"({type(err).__name__})") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2], "numpy": _numpy_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        set_cuda_rng_states(state["cuda"])


def set_cuda_rng_states(states: list) -> int:
    """Restore the saved per-GPU generator states on the GPUs this process sees; returns how
    many. A checkpoint saved on a node with more GPUs (or more visible to the saver) than this
    one resumes with the states that exist (torch.cuda.set_rng_state_all would raise
    IndexError); the devices beyond the saver's keep their seed. bip's draws come from CPU
    generators (bip.data.plan), so the CUDA states matter only for ops that sample on the GPU."""
    count = min(len(states), torch.cuda.device_count())
    for device in range(count):
        torch.cuda.set_rng_state(states[device], device)
    return count


def _numpy_state() -> list:
    # numpy's state holds an ndarray, which weights_only loading rejects: store plain ints.
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
