"""Non-finite losses, weights and scores stop a run (or are skipped, up to a limit) without
making the training step wait for the host.

A NaN or inf never recovers under SGD: a run that diverged would otherwise train on, be recorded
"done" at chance accuracy, and checkpoint garbage. ``NonFiniteGuard`` watches every step:

- Detection is a flag on the device. ``after_step`` adds ``~isfinite(loss)`` to an on-device
  counter and records the first bad step with ``torch.where``; nothing is read back, so the step
  never waits for the host (the rule of bip.testing.synccheck). ``check`` reads the counter (one sync) at
  the loop's logging points and at every epoch end BEFORE the checkpoint is written, so a
  checkpoint never holds a diverged model; it also checks every weight, score and float buffer
  (one max-abs per tensor) since a NaN score can leave the loss finite. Past the limit it raises
  ``NonFiniteError`` (a BipError: one line on the command line, recorded in error.json). With
  the default limit 0 the run stops at the first check after the first bad step: at most one
  logging interval (run.print_freq steps) is wasted, and nothing bad is saved.
- Skipping (``train.max_nonfinite_steps`` = N > 0) must undo a bad step without knowing on the
  host that it was bad. ``before_step`` copies the model state (parameters, buffers such as BN
  statistics and masks, optimizer states); ``after_step`` computes ok = finite loss AND finite
  parameters on the device and sets every tensor to ``where(ok, new, saved)``. The step is
  undone on the device, the counter counts it, and ``check`` stops the run once more than N steps
  were skipped. Copy, finiteness check and restore cost about three extra passes over the model
  and optimizer state per step (memory-bound: small next to a GPU step, noticeable on a CPU),
  which is why they are made only when N > 0. Under DDP the flags are all-reduced, so every rank skips and
  stops at the same step.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from bip.errors import BipError
from bip.methods.gsync import world_size


class NonFiniteError(BipError):
    """Training produced a non-finite loss, weight or score (more often than allowed)."""


def _distributed() -> bool:
    return world_size() > 1


class NonFiniteGuard:
    def __init__(self, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer], limit: int,
                 device: torch.device, skipped: int = 0):
        self.model, self.optimizers, self.limit = model, list(optimizers), limit
        self.count = torch.full((), skipped, dtype=torch.int64, device=device)  # bad steps so far
        self.first = torch.full((), -1, dtype=torch.int64, device=device)       # first bad step
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor, its copy)
        self.skipped = skipped  # host copy, as of the last check

    # -- the hot path: no host sync ----------------------------------------------------------
    @torch.no_grad()
    def before_step(self) -> None:
        if self.limit == 0:
            return
        # Copies reused step after step (allocating them anew costs more than copying), made
        # with one foreach call; a tensor the step creates has no copy yet (see _restore_unless).
        saved = {}
        for t in self._state():
            entry = self.saved.get(id(t))
            saved[id(t)] = entry if entry is not None and entry[0] is t else (t, torch.empty_like(t))
        self.saved = saved
        if saved:
            torch._foreach_copy_([c for _, c in saved.values()], [t.detach() for t, _ in saved.values()])

    def after_step(self, loss: torch.Tensor, step: int) -> None:
        ok = torch.isfinite(loss.detach()).all()
        if self.limit > 0:
            ok = ok & _all_finite(self._float_params())
            if _distributed():
                flag = ok.to(torch.int32)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                ok = flag.bool()
            self._restore_unless(ok)
        bad = ~ok
        self.count += bad
        self.first = torch.where(bad & (self.first < 0), step, self.first)

    @torch.no_grad()
    def _restore_unless(self, ok: torch.Tensor) -> None:
        for t in self._state():
            entry = self.saved.get(id(t))
            # A tensor the step created (an optimizer's first momentum buffer) was "absent"
            # before; zeros is the same state for SGD (dampening 0) and Adam.
            if entry is not None and entry[0] is t:
                torch.where(ok, t, entry[1], out=t)
            else:
                t.masked_fill_(~ok, 0)

    # -- at logging points and epoch ends: one sync ------------------------------------------
    def check(self, epoch: int) -> int:
        """Raise NonFiniteError past the limit; returns the bad steps so far."""
        count, first = self.count.clone(), torch.where(self.first < 0, 2**62, self.first)
        if _distributed():  # ranks saw different batches; with skipping the counts already agree
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        count, first = int(count), int(first)
        self.skipped = count
        broken = [name for name, finite in self._finite_by_name() if not finite]
        if count > self.limit or (broken and self.limit == 0):
            what = [f"non-finite loss from step {first + 1}"] if count else []
            if broken:
                what.append(f"non-finite {', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}")
            raise NonFiniteError(
                f"training diverged in epoch {epoch + 1}: {'; '.join(what)} ({count} bad step(s), "
                f"train.max_nonfinite_steps={self.limit}): lower the learning rate, or skip up to N "
                "bad steps with train.max_nonfinite_steps=N")
        if broken:  # skipping keeps the state finite: anything else is worth stopping for
            raise NonFiniteError(f"non-finite values in {', '.join(broken[:3])} after epoch {epoch + 1}")
        return count

    # -- helpers -----------------------------------------------------------------------------
    def _state(self) -> list[torch.Tensor]:
        """Every tensor a step may change: parameters, buffers, optimizer states (once each)."""
        out: dict[int, torch.Tensor] = {}
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            out.setdefault(id(t), t)
        for opt in self.optimizers:
            for state in opt.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        out.setdefault(id(value), value)
        return list(out.values())

    def _float_params(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.model.parameters() if p.is_floating_point()]

    def _finite_by_name(self) -> list[tuple[str, bool]]:
        named = [(n, t.detach()) for n, t in
                 list(self.model.named_parameters()) + list(self.model.named_buffers())
                 if t.is_floating_point()]
        if not named:
            return []
        flags = _finite_each([t for _, t in named]).tolist()
        return [(n, f) for (n, _), f in zip(named, flags)]


def _finite_each(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per tensor, on the device: are all entries finite? (max-abs per tensor: no overflow)."""
    return torch.stack([m.float() for m in torch._foreach_norm(tensors, math.inf)]).isfinite()


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return _finite_each(tensors).all()
