"""BiP as in the paper: the lower level trains the weights, the upper level the scores (with the
implicit-gradient term), alternating on two batches per step."""
from __future__ import annotations

import math

import torch.nn as nn

from bip.config import Config
from bip.methods import gsync
from bip.methods.base import Method, all_reduce_grads
from bip.methods.optim import lr_at, make_optimizer, set_lr
from bip.pruning import masking


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
        self._start_masks(model)
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
        # (mean(g_r^2) != mean(g)^2); bip.methods.gsync overlaps that all-reduce with the backward.
        sink = gsync.GReducer(self.ig_coeff) if gsync.distributed() else None
        with masking.grad_target(self.core, "scores", self.ig_coeff, sink), self._no_sync():
            loss_t, out = self._loss(x_t, y_t)
            self._backward(loss_t, y_t)
        if sink is not None:
            sink.finish()
        self._clip_score_steps(self.scores, b.beta * factor)
        self.upper.step()
        self._refresh_masks(progress)
        # train_loss is the upper level's (batch T); lower_loss the lower level's (batch V).
        return {**self._stats(loss_t, out, y_t), "lower_loss": loss_v.detach() * len(y_v)}
