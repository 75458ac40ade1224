"""Where a run starts from: --source-net or the parent run's published final.pt, its result
(lineage compute), loading it into the model, and the input a zoo model expects."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from bip.config import Config, identity
from bip.errors import BipError
from bip.models.external import input_defaults, is_external
from bip.pruning import masking
from bip.rundir import checkpoint
from bip.rundir import folder as runfolder


def resolve(cfg: Config) -> Config:
    """Fill in what a hand-made config leaves to the source: a finetune run from --source-net
    is labelled with the method that made its mask (read from a bip checkpoint). Grids set
    prune.method themselves."""
    source = identity.source_file(cfg.run.source_net) if cfg.run.source_net else None
    if cfg.run.stage == "finetune" and source is not None and source.is_file():
        meta = checkpoint.source_state(source)[1]
        if meta.get("method") and meta["method"] != "dense":
            return cfg.replace(**{"prune.method": meta["method"]})
    return cfg


def source_path(cfg: Config, root: Path) -> Path | None:
    """The model file a prune / finetune starts from: --source-net (a file, or a finished run's
    folder) or the parent run's published final.pt, never a checkpoint still being written."""
    if cfg.run.source_net:
        if cfg.run.stage == "pretrain":
            raise BipError("pretrain starts from scratch; --source-net is for prune and finetune")
        path = Path(cfg.run.source_net)
        if path.is_dir():
            return _published(path, f"--source-net {path}")
        if not path.is_file():
            raise BipError(f"--source-net file not found: {path}")
        return path
    parent = identity.parent_dir(cfg, root)
    if parent is None:
        return None
    return _published(parent, f"parent run {cfg.run.parent} (seed {cfg.run.seed})")


def parent_result(source: Path | None) -> dict | None:
    """The published result.json next to the source model (a parent run's folder), or None for
    a source that is not a finished bip run (a plain weights file)."""
    if source is None:
        return None
    try:
        doc = json.loads((source.parent / identity.RESULT).read_bytes())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("status") == "done" else None


def _published(run_dir: Path, what: str) -> Path:
    found = runfolder.inspect(run_dir)
    if found.state != "done":
        raise BipError(f"{what} has not finished ({found.state}"
                       + (f": {found.detail}" if found.detail else "") + f"; no published {identity.FINAL})")
    return runfolder.model_file(run_dir, found.result)


def load_source(cfg: Config, model: torch.nn.Module, path: Path) -> None:
    """Load the source weights (and, for finetune, its mask) into ``model``."""
    state, meta = checkpoint.source_state(path)
    state = {k.replace("popup_scores", "scores"): v for k, v in state.items()}  # released code
    if cfg.run.stage == "finetune":
        if meta and (meta.get("layer_type") != cfg.prune.layer_type or
                     not math.isclose(meta.get("k", -1.0), cfg.prune.k, rel_tol=1e-9)):
            raise BipError(f"finetune must keep the source's mask: {path} was pruned with "
                           f"layer_type={meta.get('layer_type')} k={meta.get('k')}, this run has "
                           f"layer_type={cfg.prune.layer_type} k={cfg.prune.k}")
        if not any(k.endswith("scores") or k.endswith("mask") for k in state):
            raise BipError(f"finetune needs a pruned source; {path} holds a dense model")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise BipError(f"{path} does not fit {cfg.model.arch}: {str(err).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not (k.endswith("scores") or k.endswith("mask"))]
    unexpected = [k for k in unexpected if not (k.endswith("scores") or k.endswith("mask"))]
    if missing or unexpected:
        raise BipError(f"{path} does not fit {cfg.model.arch}: missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}")
    if cfg.run.stage == "finetune" and not any(k.endswith("mask") for k in state):
        masking.refresh_masks(model, cfg.prune.k)  # a released-code checkpoint: scores only


def model_input(cfg: Config, spec):
    """tv:/timm: models see images normalised with their pretrained mean/std (when
    data.normalize) and, for ImageNet-style data without data.image_size, cropped at their
    input size; small datasets keep their size and the model resizes on the device."""
    if not is_external(cfg.model.arch):
        return spec
    native = input_defaults(cfg.model.arch)
    changes = {"mean": native.mean, "std": native.std} if native.mean else {}
    if spec.style == "imagenet" and not cfg.data.image_size:
        changes["image_size"] = cfg.model.input_size or native.size
    return dataclasses.replace(spec, **changes)


def rewind_epoch(cfg: Config) -> int:
    """The pretrain epoch saved for IMP's rewinding (default: 5% of training, at least 1)."""
    if cfg.train.rewind_epoch >= 0:
        return cfg.train.rewind_epoch
    return max(1, round(0.05 * cfg.train.epochs))
