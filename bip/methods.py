"""Per-batch update rules: the only thing that differs between methods in the one loop.

A Method prepares the model for its stage (score init, masks, which tensors train), owns its
optimizers, and turns a step's batches into parameter updates. ``step`` returns on-device
tensors (loss, correct, n) so the loop syncs with the device only when it logs.

| method   | trains                                   | mask                                 |
|----------|------------------------------------------|--------------------------------------|
| dense    | everything (pretrain)                    | none                                 |
| finetune | weights, biases, BN; pruned weights = 0  | fixed, from the source               |
| hydra    | scores (+ BN affine); weights frozen     | top-k of |scores|, every step        |
|  (ref.)  | prune.variant=reference: the released HYDRA run (bip.bip_reference.HydraReference) |
| bip      | lower: weights on batch V; upper: scores | top-k of |scores|, every step        |
| omp      | nothing (one-shot, finetune afterwards)  | magnitude (global, per layer or N:M) |
| random   | nothing (one-shot, finetune afterwards)  | random                               |
| imp      | weights, one round per run (bip/imp.py)  | -20% of the parent's by magnitude    |
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from bip import gsync, imp, masking
from bip.config import Config
from bip.errors import BipError
from bip.optim import lr_at, make_optimizer, set_lr

Batch = tuple[torch.Tensor, torch.Tensor]


def bn_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False)]


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Average gradients over ranks by hand: BiP's two passes each update a different set of
    tensors, which DDP's per-backward bucket hooks cannot express."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
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
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])

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

    def _sgd_step(self, opt, batch: Batch, lr: float) -> dict[str, torch.Tensor]:
        set_lr(opt, lr)
        opt.zero_grad(set_to_none=True)
        loss, out = self._loss(*batch)
        self._backward(loss, batch[1])
        opt.step()
        return self._stats(loss, out, batch[1])


class Dense(Method):
    """Pretrain (dense) and finetune (fixed mask): every weight, bias and BN parameter trains."""

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__(cfg, model)
        scores = masking.all_score_ids(model)
        for p in model.parameters():
            p.requires_grad_(id(p) not in scores)
        if cfg.run.stage != "pretrain":
            # Pruned weights start at exactly 0; their gradient M * dL/dZ is 0, so they stay 0.
            masking.zero_pruned_weights(model)
        o = cfg.optim
        self.opt = make_optimizer(o.optimizer, [p for p in model.parameters() if p.requires_grad],
                                  o.lr, o.momentum, o.wd, o.nesterov)
        self.optimizers = {"weights": self.opt}

    def step(self, batches, progress):
        return self._sgd_step(self.opt, batches[0], self._lr(progress))


class Hydra(Method):
    """HYDRA: scores (and BN affine, prune.train_bn) train by SGD; weights stay frozen."""

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__(cfg, model)
        masking.init_scores(model, cfg.prune.score_init)
        masking.refresh_masks(model, cfg.prune.k)
        trained = {id(p) for p in masking.score_parameters(model)}
        if cfg.prune.train_bn:
            trained |= {id(p) for p in bn_parameters(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
        o = cfg.optim
        self.opt = make_optimizer(o.optimizer, [p for p in model.parameters() if p.requires_grad],
                                  o.lr, o.momentum, o.wd, o.nesterov)
        self.optimizers = {"scores": self.opt}

    def step(self, batches, progress):
        stats = self._sgd_step(self.opt, batches[0], self._lr(progress))
        masking.refresh_masks(self.core, self.cfg.prune.k)
        return stats


class BipPaper(Method):
    """BiP as in the paper (Alg. A1): per step, one lower SGD step on the weights theta
    (weights, biases, BN affine; lr alpha, ridge = weight decay) on batch V with the mask
    fixed, then on a different batch T at the updated theta one SGD step on the scores with
    sign(S) * (W * g - (1/gamma) * M * g^2), g = dL/dZ (lr beta), then a new mask.
    Both lrs follow optim.lr_schedule's shape (warm-up from 0)."""

    streams = 2

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__(cfg, model)
        b = cfg.bip
        masking.init_scores(model, cfg.prune.score_init)
        masking.refresh_masks(model, cfg.prune.k)
        all_scores = masking.all_score_ids(model)
        self.theta = [p for p in model.parameters() if id(p) not in all_scores]
        self.scores = masking.score_parameters(model)  # those of layers left dense never train
        trained = {id(p) for p in self.theta + self.scores}
        for p in model.parameters():  # fixed for DDP; each pass picks its targets instead
            p.requires_grad_(id(p) in trained)
        self.lower = make_optimizer("sgd", self.theta, b.alpha, b.momentum, b.lower_wd)
        self.upper = make_optimizer("sgd", self.scores, b.beta, b.momentum, b.upper_wd)
        self.optimizers = {"lower": self.lower, "upper": self.upper}
        self.ig_coeff = 0.0 if math.isinf(b.gamma) else 1.0 / b.gamma

    def step(self, batches, progress):
        (x_t, y_t), (x_v, y_v) = batches  # stream 0 feeds the upper level, stream 1 the lower
        o, b = self.cfg.optim, self.cfg.bip
        factor = lr_at(o.lr_schedule, 1.0, progress, self.epochs(), o.warmup_epochs, 0.0)
        set_lr(self.lower, b.alpha * factor)
        set_lr(self.upper, b.beta * factor)

        self.lower.zero_grad(set_to_none=True)
        with masking.grad_target(self.core, "weights"), self._no_sync():
            loss_v, _ = self._loss(x_v, y_v)
            self._backward(loss_v, y_v)
        all_reduce_grads(self.theta)
        self.lower.step()

        self.upper.zero_grad(set_to_none=True)
        # Under DDP, g = dL/dZ is averaged over ranks before the score gradient squares it
        # (mean(g_r^2) != mean(g)^2); bip.gsync overlaps that all-reduce with the backward.
        sink = gsync.GReducer(self.ig_coeff) if gsync.distributed() else None
        with masking.grad_target(self.core, "scores", self.ig_coeff, sink), self._no_sync():
            loss_t, out = self._loss(x_t, y_t)
            self._backward(loss_t, y_t)
        if sink is not None:
            sink.finish()
        self.upper.step()
        masking.refresh_masks(self.core, self.cfg.prune.k)
        return self._stats(loss_t, out, y_t)


class OneShot(Method):
    """OMP (global magnitude) or random masks at keep ratio k; nothing trains."""

    one_shot = True

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__(cfg, model)
        if cfg.prune.method == "omp":
            masking.init_scores(model, "magnitude")
        else:  # i.i.d. uniform scores: every weight (filter, channel) equally likely to stay
            with torch.no_grad():
                for _, m in masking.masked_layers(model):
                    m.scores.uniform_()
        masking.refresh_masks(model, cfg.prune.k)


class Imp(Dense):
    """One IMP round (bip/imp.py): from the parent's trained weights and mask, prune by global
    magnitude down to prune.k (at most prune.imp_rate of what the parent kept; pruned weights
    rank last, so masks are nested), rewind to the pretrain's early weights (rewind.pt) and
    retrain for train.epochs with a fresh optimizer."""

    def __init__(self, cfg: Config, model: nn.Module, source: "imp.Source"):
        super().__init__(cfg, model)
        if cfg.train.epochs < 1:
            raise BipError("imp needs train.epochs >= 1 (epochs per round)")
        imp.check_step(cfg.prune.k, cfg.prune.imp_rate, source.density, source.round)
        self.round = source.round + 1
        rewind_state = _rewind_weights(model, source.rewind)
        with torch.no_grad():
            for _, m in masking.masked_layers(model):
                m.scores.copy_(m.weight.abs() * m.mask)  # pruned weights rank last
        masking.refresh_masks(model, cfg.prune.k)
        # Scores and masks are this run's own (the rewind source is dense); everything else was
        # checked to be present, so a partial rewind cannot pass unnoticed.
        model.load_state_dict(rewind_state, strict=False)
        masking.zero_pruned_weights(model)


def _rewind_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rewind state without scores and masks; every other tensor of ``model`` must be in it
    with its shape, and nothing else may be (a one-line BipError otherwise)."""
    own = {f"{name}.{part}" for name, _ in masking.masked_layers(model) for part in ("scores", "mask")}
    want = {k: v.shape for k, v in model.state_dict().items() if k not in own}
    state = {k: v for k, v in state.items() if k not in own}
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    wrong = [k for k in want if k in state and state[k].shape != want[k]]
    if missing or unexpected or wrong:
        raise BipError("imp: rewind.pt does not fit this model: "
                       + "; ".join(f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                                   for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                      ("wrong shape", wrong)) if keys))
    return state


def create_method(cfg: Config, model: nn.Module, imp_source: "imp.Source | None" = None) -> Method:
    """The Method for this run's stage and prune.method."""
    if cfg.run.stage in ("pretrain", "finetune"):
        return Dense(cfg, model)
    method = cfg.prune.method
    if method == "hydra":
        if cfg.prune.variant == "reference":
            from bip.bip_reference import HydraReference
            return HydraReference(cfg, model)
        return Hydra(cfg, model)
    if method == "bip":
        if cfg.bip.variant == "reference":
            from bip.bip_reference import BipReference
            return BipReference(cfg, model)
        if cfg.bip.variant == "fused":
            from bip.fused import BipFused  # one pass per step (bip/fused.py)
            return BipFused(cfg, model)
        return BipPaper(cfg, model)
    if method in ("omp", "random"):
        return OneShot(cfg, model)
    if method == "imp":
        if imp_source is None:
            raise BipError("imp needs the source run's rewind.pt (written by pretrain)")
        return Imp(cfg, model, imp_source)
    raise BipError(f"unknown method {method!r}")
