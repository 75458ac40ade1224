"""What happens at a step boundary, decided in one place: go on, save a step checkpoint, save and
stop (a stop was requested), or stop without writing (the lease is gone).

Signal handlers only record a stop request (``install_stop_signals``, the one copy the trainer,
the submitit job and the local worker share); ``StepBoundary.poll`` turns the request, the
checkpoint cadence and the lease into an ``Action`` that every rank agrees on.
"""
from __future__ import annotations

import signal
import time
from enum import IntEnum
from typing import Callable


class Action(IntEnum):
    GO = 0      # nothing to do at this boundary
    SAVE = 1    # a step checkpoint is due (train.checkpoint_every_min)
    STOP = 2    # a stop was requested: save, then raise Interrupted
    LOST = 3    # the lease went to another trainer: write nothing, stop


class Interrupted(BaseException):
    """Raised by the loop after it saved a checkpoint because a stop was requested (a signal).
    A BaseException: it is not a failure, so no error.json is written."""


_STOP: list[str] = []


def request_stop(reason: str) -> None:
    """Ask the running loop to checkpoint at its next step boundary and stop (signal-safe)."""
    _STOP.append(reason)


def stop_reason() -> str | None:
    """The first stop request, if any."""
    return _STOP[0] if _STOP else None


def stop_signals() -> list[str]:
    """Every stop request so far, in order, without repeats."""
    return list(dict.fromkeys(_STOP))


def clear_stop() -> None:
    _STOP.clear()


_GLOO: dict = {}


class Cadence:
    """When the loop saves a step checkpoint: every ``every_min`` minutes, and at once (then
    stops) after ``request_stop``. poll() returns an Action.

    With several ranks one tiny all-reduce (MAX) of the decision per step makes every rank
    agree on the step, whatever each rank's clock or signal timing. It runs on a CPU tensor
    over gloo (a gloo group beside NCCL on GPUs): it never enters the CUDA stream, so the
    device never waits for it, and the host, which runs ahead of the device, spends about a
    hundred microseconds per step on it."""

    def __init__(self, every_min: float, world: int):
        self.every_s, self.world, self.last = every_min * 60, world, time.monotonic()
        if world > 1:
            import torch
            import torch.distributed as dist
            if dist.get_backend() != "gloo" and "group" not in _GLOO:  # every rank, same order
                _GLOO["group"] = dist.new_group(backend="gloo")
            self.group = _GLOO.get("group") if dist.get_backend() != "gloo" else None
            self.flag = torch.zeros(1, dtype=torch.int32)

    def saved(self) -> None:
        self.last = time.monotonic()

    def poll(self, lost: bool = False) -> Action:
        """``lost``: this rank's lease is gone (LOST: every rank stops without writing)."""
        code = Action.LOST if lost else Action.STOP if stop_reason() else \
            Action(int(time.monotonic() - self.last >= self.every_s))
        if self.world > 1:
            import torch.distributed as dist
            self.flag.fill_(code)
            dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group)
            code = Action(int(self.flag[0]))  # a CPU tensor: no device sync
        return code




class StepBoundary:
    """The one object the loop asks at every step boundary. ``poll`` returns the agreed Action
    and, for LOST, raises the folder's FencedOut (one line naming the new owner) on every rank; before a SAVE or STOP it
    runs ``before_save`` (the non-finite guard's check: a diverged state is never saved)."""

    def __init__(self, folder, every_min: float, world: int, before_save: Callable[[], None]):
        self.folder, self.before_save = folder, before_save
        self.cadence = Cadence(every_min, world)

    def poll(self) -> Action:
        action = self.cadence.poll(lost=self.folder.lease_lost())
        if action == Action.LOST:
            self.folder.check_lease(lost=True)
        if action != Action.GO:
            self.before_save()
        return action

    def saved(self) -> None:
        self.cadence.saved()


def install_stop_signals(*signums: int) -> dict:
    """Turn these signals into a stop request (checkpoint at the next step boundary, then
    stop). Returns the previous handlers, for ``restore_signals``."""
    def handler(num, _frame):
        request_stop(signal.Signals(num).name)
    return {signum: signal.signal(signum, handler) for signum in signums}


def restore_signals(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
