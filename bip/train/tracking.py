"""Experiment trackers: ``train.log_with = none | tensorboard | wandb``.

The same per-epoch rows as metrics.jsonl (accuracies, losses, compute so far: bip.train.compute) go
to one tracker run per bip run, from the main rank only, with the epoch as the step. Not part
of a run's identity. The libraries are optional extras (``pip install -e '.[tensorboard]'`` or
``'.[wandb]'``); a missing one is a one-line error before the run folder is touched.

- tensorboard: event files in ``RUN_DIR/tensorboard/`` (a run writes only its own folder), so
  ``tensorboard --logdir ROOT`` lists every run as ``<run id>/seed_<s>/tensorboard``; the grid
  (``run.exp_name``, which a grid sets to its name) is logged as the text ``grid``.
- wandb: run name ``<run id>/seed_<s>``, group = the grid (``run.exp_name``, else the result
  folder's name), project ``$WANDB_PROJECT`` or ``bip``, files under ``RUN_DIR/wandb/``; the run
  id is derived from the run folder, so a resumed run continues its W&B run. Offline unless
  ``WANDB_MODE`` says otherwise (compute nodes often have no internet; ``wandb sync`` uploads).
"""
from __future__ import annotations

import hashlib
import importlib.util
import numbers
import os
from pathlib import Path

from bip.config import Config
from bip.errors import BipError

_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check(cfg: Config) -> None:
    """The tracker's library is importable (called before anything is written)."""
    kind = cfg.train.log_with
    if kind != "none" and importlib.util.find_spec(_PACKAGE[kind]) is None:
        raise BipError(f"train.log_with={kind} needs the {_PACKAGE[kind]} package: "
                       f"pip install -e '.[{kind}]' (or train.log_with=none)")


def group(cfg: Config) -> str:
    return cfg.run.exp_name or Path(cfg.run.result_dir).name


def numeric(row: dict) -> dict[str, float]:
    """The scalars of a metrics row (lists such as collapsed_layers are not plotted; booleans
    become 0 / 1)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, numbers.Real) and k != "epoch"}


class Tracker:
    def log(self, row: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class _TensorBoard(Tracker):
    def __init__(self, cfg: Config, run_dir: Path, name: str):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("grid", group(cfg), 0)
        self.writer.add_text("run", name, 0)

    def log(self, row: dict, step: int) -> None:
        for key, value in numeric(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB(Tracker):
    def __init__(self, cfg: Config, run_dir: Path, name: str):
        import wandb
        os.environ.setdefault("WANDB_MODE", "offline")
        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "bip"), name=name, group=group(cfg),
                              id=run_id, resume="allow", dir=str(run_dir), config=cfg.to_dict(),
                              reinit=True)

    def log(self, row: dict, step: int) -> None:
        self.run.log(numeric(row), step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(cfg: Config, run_dir: Path, run_id: str, main: bool) -> Tracker:
    """The run's tracker on the main rank; a no-op elsewhere and for log_with=none."""
    kind = cfg.train.log_with
    if not main or kind == "none":
        return Tracker()
    name = f"{run_id}/seed_{cfg.run.seed}"
    return (_TensorBoard if kind == "tensorboard" else _WandB)(cfg, Path(run_dir), name)
