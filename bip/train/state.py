"""The training state of a run, and the checkpoint files that carry it across a restart.

``TrainState`` is everything the loop advances besides the model and the optimizers; its saved
fields are listed once (``SAVED``). A checkpoint is that state plus the model, the method's
optimizers, every RNG and the run's meta, all ``torch.load(weights_only=True)``-loadable.

Formats: ``bip-checkpoint-2`` (written) holds every field. ``bip-checkpoint-1`` files (written
until the subpackage layout) are read by their own loader, which fills the mid-epoch fields an
epoch-end checkpoint of that format may lack. ``tests/rundir/test_old_runs.py`` resumes a
v1 fixture written by that code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bip.config import Config, identity
from bip.errors import BipError
from bip.models import model_options
from bip.rundir import checkpoint
from bip.train import compute
from bip.train.distributed import check_checkpoint, reduce_totals

FORMAT = checkpoint.FORMAT
FINAL_FORMAT = checkpoint.FINAL_FORMAT  # final.pt: model + masks + meta, no training state


def _no_best() -> dict:
    return {"val_acc": -1.0, "epoch": 0, "test_acc": None}


@dataclass
class TrainState:
    epoch: int = 0                 # epochs completed
    step: int = 0                  # global steps completed
    step_in_epoch: int = 0         # steps of the current epoch completed (0 at an epoch boundary)
    totals: dict = field(default_factory=dict)   # this epoch's loss / correct / n sums (bip.train.distributed)
    epoch_time_s: float = 0.0      # this epoch's training time so far
    best: dict = field(default_factory=_no_best)  # the best validation epoch so far
    wall_time_s: float = 0.0       # training time of the completed epochs
    nonfinite_steps: int = 0       # skipped steps (train.max_nonfinite_steps)
    compute: dict = field(default_factory=compute.new)
    resumed_from: str | None = None  # this start's source (not saved)

    SAVED = ("epoch", "step", "step_in_epoch", "totals", "epoch_time_s", "best", "wall_time_s",
             "nonfinite_steps", "compute")

    def end_epoch(self) -> None:
        """Close the epoch just trained (its row was written from the fields before)."""
        self.wall_time_s += self.epoch_time_s
        self.epoch, self.step_in_epoch, self.totals, self.epoch_time_s = self.epoch + 1, 0, {}, 0.0

    def to_checkpoint(self, cfg: Config, method, epoch_time_s: float | None = None) -> dict:
        """Everything an exact resume at this step boundary needs. ``totals`` are summed over
        ranks; ``epoch_time_s`` overrides the field for a mid-epoch save."""
        saved = {name: getattr(self, name) for name in self.SAVED}
        saved.update(totals=reduce_totals(self.totals), compute=dict(self.compute))
        if epoch_time_s is not None:
            saved["epoch_time_s"] = epoch_time_s
        return {"format": FORMAT, "model": method.core.state_dict(), "method": method.state_dict(),
                "rng": checkpoint.rng_state(), **saved, "meta": meta(cfg, method.num_classes)}

    @classmethod
    def from_checkpoint(cls, ckpt: dict, path: Path, method) -> "TrainState":
        """Load the model, the optimizers and the RNGs from ``ckpt``; return its state. A file
        of another format, or one that lacks a field or does not fit, is a one-line BipError."""
        loader = LOADERS.get(ckpt.get("format"))
        if loader is None:
            raise BipError(f"{path} is not a bip checkpoint (cannot resume from it)")
        fields = loader(ckpt, path)
        try:
            method.core.load_state_dict(ckpt["model"])
            method.load_state_dict(ckpt["method"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise BipError(f"{path} does not match this run's model/method ({type(err).__name__})") from None
        try:
            checkpoint.set_rng_state(ckpt["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise BipError(f"{path} holds an unusable RNG state ({type(err).__name__})") from None
        return cls(**fields)


def _require(ckpt: dict, path: Path, keys) -> None:
    lacking = [k for k in keys if k not in ckpt]
    if lacking:
        raise BipError(f"{path} cannot be resumed from: it lacks {', '.join(lacking)}")


def _load_v2(ckpt: dict, path: Path) -> dict:
    _require(ckpt, path, ("model", "method", "rng", *TrainState.SAVED))
    fields = {k: ckpt[k] for k in TrainState.SAVED}
    return {**fields, "totals": dict(fields["totals"]), "nonfinite_steps": int(fields["nonfinite_steps"]),
            "compute": {**compute.new(), **fields["compute"]}}


def _load_v1(ckpt: dict, path: Path) -> dict:
    """bip-checkpoint-1: an epoch-end checkpoint may lack the mid-epoch fields and compute."""
    _require(ckpt, path, ("model", "method", "rng", "epoch", "step", "best", "wall_time_s"))
    return {"epoch": ckpt["epoch"], "step": ckpt["step"], "best": ckpt["best"],
            "wall_time_s": ckpt["wall_time_s"], "step_in_epoch": ckpt.get("step_in_epoch", 0),
            "totals": dict(ckpt.get("totals", {})), "epoch_time_s": ckpt.get("epoch_time_s", 0.0),
            "nonfinite_steps": int(ckpt.get("nonfinite_steps", 0)),
            "compute": {**compute.new(), **ckpt.get("compute", {})}}


LOADERS = {"bip-checkpoint-2": _load_v2, "bip-checkpoint-1": _load_v1}
assert set(LOADERS) == set(checkpoint.CHECKPOINT_FORMATS)


def meta(cfg: Config, num_classes: int) -> dict:
    """What made a checkpoint or final.pt (read by finetune, export and --resume checks)."""
    return {"stage": cfg.run.stage, "method": cfg.method_label,
            "layer_type": cfg.prune.layer_type, "k": cfg.prune.k, "arch": cfg.model.arch,
            "dataset": cfg.data.dataset, "run_id": identity.run_id(cfg), "seed": cfg.run.seed,
            "num_classes": num_classes, "n": cfg.prune.n, "m": cfg.prune.m,  # n, m: N:M masks
            "world_size": cfg.train.world_size,
            "model_options": model_options(cfg.model)}


def final_file(cfg: Config, method) -> dict:
    """final.pt: the trained model (weights, scores, masks, BN statistics) and what made it."""
    return {"format": FINAL_FORMAT, "model": method.core.state_dict(), "meta": meta(cfg, method.num_classes)}


def resume_file(value: str) -> Path:
    """A --resume value as a file: a run folder means its checkpoint.pt (which a finished run
    keeps); a folder without one is refused here, so the message says what the folder lacks."""
    path = Path(value)
    if not path.is_dir():
        return path
    if not (path / identity.CHECKPOINT).is_file():
        what = ("a run folder without {} (it never saved one)" if (path / identity.CONFIG).is_file()
                else "a folder without {} (neither a run folder nor a checkpoint file)")
        raise BipError(f"--resume {path} is {what.format(identity.CHECKPOINT)}: give a checkpoint "
                       "file or a run folder that holds one")
    return path / identity.CHECKPOINT


def seed_checkpoint(cfg: Config) -> dict:
    """The --resume checkpoint (a file or a run folder's checkpoint.pt), checked before anything
    is written: it must be a bip checkpoint of THIS run (same run id and seed) unless
    run.resume_foreign=true."""
    path = resume_file(cfg.run.resume)
    ckpt = checkpoint.load(path, "resume checkpoint")
    loader = LOADERS.get(ckpt.get("format"))
    if loader is None or not isinstance(ckpt.get("meta"), dict):
        raise BipError(f"{path} is not a bip checkpoint (cannot resume from it)")
    loader(ckpt, path)  # what is missing says more than whose it is
    got = ckpt["meta"]
    mine = (identity.run_id(cfg), cfg.run.seed)
    if (got.get("run_id"), got.get("seed")) != mine and not cfg.run.resume_foreign:
        raise BipError(f"--resume {path} is a checkpoint of run {got.get('run_id')} seed "
                       f"{got.get('seed')}, not of this run ({mine[0]} seed {mine[1]}); "
                       "run.resume_foreign=true resumes it anyway")
    check_checkpoint(got, cfg, path)
    return ckpt
