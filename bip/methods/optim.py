"""Optimizers and learning-rate schedules.

Our schedules are evaluated per step at a fractional epoch (``progress`` in [0, epochs)):
linear warm-up from ``warmup_lr`` over ``warmup_epochs``, then cosine to 0, 50%/75% step decay
(x0.1 each, BiP's step schedule) or constant. ``reference_lr`` reproduces the released BiP
code instead: one value per epoch, and its cosine uses (epoch - 1), so epoch 0 is slightly
below the base lr and the last epoch never reaches 0.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch


def lr_at(schedule: str, base: float, progress: float, epochs: int, warmup_epochs: int = 0,
          warmup_lr: float | None = None) -> float:
    if progress < warmup_epochs:
        start = base if warmup_lr is None else warmup_lr
        return start + (base - start) * progress / warmup_epochs
    span = max(epochs - warmup_epochs, 1)
    t = min(max((progress - warmup_epochs) / span, 0.0), 1.0)
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "step":
        return base * (1.0 if t < 0.5 else 0.1 if t < 0.75 else 0.01)
    if schedule == "constant":
        return base
    raise ValueError(f"unknown lr schedule {schedule!r}")


def reference_lr(schedule: str, base: float, epoch: int, epochs: int) -> float:
    """The released code's per-epoch schedules (utils/schedules.py), quirks included, in its
    op order (np.cos of (e - 1) / E * pi; base * 0.1, not base / 10) so that it is bitwise equal."""
    if schedule == "cosine":
        return float(base * 0.5 * (1 + np.cos((epoch - 1) / epochs * np.pi)))
    if schedule == "step":
        return base if epoch < 0.5 * epochs else base * 0.1 if epoch < 0.75 * epochs else base * 0.01
    if schedule == "constant":
        return base
    raise ValueError(f"unknown reference lr schedule {schedule!r}")


def make_optimizer(kind: str, params: Iterable[torch.nn.Parameter], lr: float, momentum: float,
                   weight_decay: float, nesterov: bool = False,
                   foreach: bool | None = None) -> torch.optim.Optimizer:
    params = list(params)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov and momentum > 0, foreach=foreach)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=foreach)
    raise ValueError(f"unknown optimizer {kind!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
