"""What every method shares: the Method interface the one loop drives, and its helpers.

A Method prepares the model for its stage (score init, masks, which tensors train), owns its
optimizers, and turns a step's batches into parameter updates. ``step`` returns on-device
tensors (loss, correct, n) so the loop syncs with the device only when it logs. The methods
themselves (one module per family) and their registry are listed in bip/methods/__init__.py.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from bip.pruning import masking
from bip.pruning.monitor import MaskMonitor
from bip.config import Config
from bip.methods.gsync import world_size
from bip.methods.optim import lr_at, set_lr

Batch = tuple[torch.Tensor, torch.Tensor]


def bn_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False)]


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Average gradients over ranks by hand: BiP's two passes each update a different set of
    tensors, which DDP's per-backward bucket hooks cannot express."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def autocast(cfg: Config, device_type: str):
    """Mixed precision for one run (train.mixed_precision): torch.autocast, not accelerate's,
    because accelerate keeps ONE precision per process (AcceleratorState), so a second run with
    another precision in the same process (the --debug executor, library users) would fail."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16")


class Method:
    streams = 1          # training streams read per step (BiP: 2)
    one_shot = False     # True: the run trains nothing (epochs are skipped)

    def __init__(self, cfg: Config, model: nn.Module):
        self.cfg, self.core, self.model = cfg, model, model
        self.accelerator = None
        first = next(model.parameters(), None)
        self.device_type = first.device.type if first is not None else "cpu"
        last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.num_classes = last_linear[-1].out_features if last_linear else 0
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        # Training examples through a forward / a backward of the model on this process since
        # the last take_passes(): host ints from batch shapes, so counting never syncs.
        self._passes = [0, 0]
        self.monitor: MaskMonitor | None = None  # score-based methods (bip.pruning.monitor)
        self._refreshes = 0  # optimizer steps so far (prune.refresh_every counts them)
        self.ramp_end = 0.0  # epochs of the sparsity ramp: the mask keeps exactly k after them
        if cfg.run.stage == "prune":  # skip, N:M groups, budget scope and floor of this run
            masking.configure(model, cfg.prune)

    def attach(self, model: nn.Module, accelerator=None) -> None:
        """The (possibly DDP-wrapped) model to run forwards through, and the accelerator."""
        self.model, self.accelerator = model, accelerator

    def epochs(self) -> int:
        return 0 if self.one_shot else self.cfg.train.epochs

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def step(self, batches: list[Batch], progress: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def take_passes(self) -> tuple[int, int]:
        """(forward, backward) example passes on this process since the last call."""
        passes, self._passes = tuple(self._passes), [0, 0]
        return passes

    def state_dict(self) -> dict:
        state = {name: opt.state_dict() for name, opt in self.optimizers.items()}
        if self.monitor is not None:
            state["_monitor"] = self.monitor.state_dict()
        if self._refreshes:  # prune.refresh_every counts from the run's first step
            state["_refreshes"] = self._refreshes
        return state

    def load_state_dict(self, state: dict) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])
        # Absent in checkpoints written before run.diagnostics: that epoch's churn then counts
        # from the resume (the training state itself is exact either way).
        if self.monitor is not None and "_monitor" in state:
            self.monitor.load_state_dict(state["_monitor"])
        self._refreshes = int(state.get("_refreshes", 0))

    # score-based methods -------------------------------------------------------------------
    def _start_masks(self, model: nn.Module) -> None:
        """Scores from prune.score_init, the first mask (at the ramp's start density) and the
        mask monitor (run.diagnostics)."""
        masking.init_scores(model, self.cfg.prune.score_init)
        k = self.cfg.prune.k
        masking.refresh_masks(model, k)  # the monitor's start mask is the one at k
        self._start_monitor(model)
        if self.cfg.prune.ramp_epochs:
            self.ramp_end = self.cfg.prune.ramp_epochs
            masking.refresh_masks(model, masking.ramp_k(k, 0.0, self.ramp_end))

    def _start_monitor(self, model: nn.Module, rule: str = "nearest") -> None:
        """The mask monitor (run.diagnostics), from the first mask at k (reads nothing it changes)."""
        if self.cfg.run.diagnostics != "none":
            self.monitor = MaskMonitor(model, self.cfg.prune.k, self.cfg.run.diagnostics, rule)

    @torch.no_grad()
    def _clip_score_steps(self, scores: list[torch.Tensor], lr: float) -> None:
        """prune.score_step_clip = c: scale each layer's score gradient so that lr * ||grad|| <=
        c * ||scores|| (before momentum). At 98 % sparsity BatchNorm divides nearly empty
        channels by their tiny spread, and one step can move a layer's scores several times
        their own size (docs/experiments/2026-12-08-high-sparsity.md). Device ops only; under DDP
        the gradients are already averaged here."""
        c = self.cfg.prune.score_step_clip
        params = [s for s in scores if s.grad is not None]
        if not c or lr <= 0 or not params:
            return
        grads = [s.grad for s in params]
        g_norms = torch._foreach_norm(grads)
        s_norms = torch._foreach_norm([s.detach() for s in params])
        for g, gn, sn in zip(grads, g_norms, s_norms):
            g.mul_((c * sn / (lr * gn).clamp_min(1e-30)).clamp(max=1.0))

    def _refresh_masks(self, progress: float) -> None:
        """After an optimizer step: a new mask every prune.refresh_every steps, at the budget of
        the sparsity ramp (prune.ramp_epochs), then the monitor's step sums."""
        p = self.cfg.prune
        self._refreshes += 1
        if self._refreshes % p.refresh_every == 0:
            masking.refresh_masks(self.core, masking.ramp_k(p.k, progress, p.ramp_epochs))
        if self.monitor is not None:
            self.monitor.after_refresh()

    # helpers -------------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.cfg, self.device_type)

    def _no_sync(self):
        no_sync = getattr(self.model, "no_sync", None)
        return no_sync() if no_sync else contextlib.nullcontext()

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            out = self._forward(x)
            loss = F.cross_entropy(out, y, label_smoothing=self.cfg.train.label_smoothing)
        return loss, out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every training forward goes through here (counted)."""
        self._passes[0] += x.shape[0]
        return self.model(x)

    def _backward(self, loss: torch.Tensor, y: torch.Tensor) -> None:
        """Every training backward goes through here (counted: len(y) examples)."""
        self._passes[1] += y.shape[0]
        loss.backward()

    @staticmethod
    def _stats(loss, out, y) -> dict[str, torch.Tensor]:
        return {"loss": loss.detach() * len(y), "correct": (out.argmax(1) == y).sum(), "n": len(y)}

    def _lr(self, progress: float, epochs: int | None = None) -> float:
        o = self.cfg.optim
        return lr_at(o.lr_schedule, o.lr, progress, epochs or self.epochs(), o.warmup_epochs, o.warmup_lr)

    def _sgd_step(self, opt, batch: Batch, lr: float, before_step=None) -> dict[str, torch.Tensor]:
        set_lr(opt, lr)
        opt.zero_grad(set_to_none=True)
        loss, out = self._loss(*batch)
        self._backward(loss, batch[1])
        if before_step is not None:
            before_step()
        opt.step()
        return self._stats(loss, out, batch[1])
