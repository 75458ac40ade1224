"""BiP and its HYDRA baseline as the released code runs them (OPTML-Group/BiP trainer/bilevel.py
and trainer/base.py), quirk for quirk, bitwise in float64 (tests/test_methods.py).

Use ``bip.variant=reference`` (BiP) or ``prune.variant=reference`` (HYDRA) to match published
numbers or to check against that code; the default ``paper`` variants (bip.methods.bilevel.BipPaper,
bip.methods.Hydra) implement the papers' updates. HYDRA's reference variant (HydraReference) is
the released ``--trainer base`` prune run: the same score init (aliasing or the 1/sqrt(k)
rescale, below), ONE SGD optimizer over all parameters with per-epoch lrs (cosine with the
(epoch - 1) offset), weights and biases frozen but moved through the aliased scores, BN affine
trained (unless prune.train_bn=false), the floor((1 - k) n) count rule.
What BipReference reproduces (../shared/reference/bip-reference-code.md, sections 2.4, 4 and 8):

- Aliasing (A1): with --scaled-score-init the scores ARE the weights (one storage), so every
  update of either moves both and the mask is the top-k of |W| after each update. Without it,
  scores keep their random init and every weight is multiplied by 1/sqrt(k) (A8).
- Two SGD optimizers (A: lower, B: mask), EACH over all parameters in model order, each with its
  own momentum; single-tensor updates in order (foreach off: with aliasing the order matters).
- PyTorch-1.x grads: zero_grad fills zeros instead of deleting, so a parameter that ever had a
  gradient keeps a slot, and SGD applies weight decay and momentum to it with a zero gradient
  (A6): A decays the scores from iteration 1, B decays W and b from iteration 0.
- The "implicit gradient" (A2): the prune-pass gradient gM is multiplied slot by slot with the
  full-pass gradient gB of the same batch, G = gM - lr2 * gM * gB, instead of the paper's
  -(1/gamma) * M * g^2.
- lr schedules (A3): A follows optim.lr_schedule from optim.lr; B follows bip.mask_lr_schedule
  but ALSO from optim.lr (bip.mask_lr is overwritten before the first step); one value per
  epoch, cosine with the (epoch - 1) offset.
- BN affine trains at both levels and gets the IG term (A5); four train-mode forwards per step
  (V, T, T, T: BN running stats move four times), three backwards.
- Kept count: floor((1 - k) * n) units are zeroed (masking.keep_count rule "reference").
Not reproduced: the released code's lack of a validation split (use data.val_fraction=0) and
its test-set model selection (we report both final and best-on-validation).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from bip.config import Config
from bip.methods.base import Method, all_reduce_grads, bn_parameters
from bip.methods.optim import make_optimizer, reference_lr, set_lr
from bip.pruning import masking


def released_score_init(cfg: Config, model: nn.Module) -> None:
    """train.py of the released code in prune mode: with --scaled-score-init (our
    score_init=magnitude) the scores ARE the weights; otherwise the scores keep their random init
    and every conv / linear weight is multiplied by 1/sqrt(k)."""
    if cfg.prune.score_init == "magnitude":
        masking.alias_scores_to_weights(model)
    else:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.weight.mul_(1.0 / math.sqrt(cfg.prune.k))


class BipReference(Method):
    streams = 2

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__(cfg, model)
        o, b = cfg.optim, cfg.bip
        released_score_init(cfg, model)
        self.params = list(model.parameters())
        for p in self.params:
            p.requires_grad_(True)
        self.scores = [m.scores for _, m in masking.masked_layers(model)]
        bn = {id(p) for p in bn_parameters(model)}
        not_weights = bn | {id(p) for p in self.scores}
        self.weights = [p for p in model.parameters() if id(p) not in not_weights]
        self.bn = [p for p in self.params if id(p) in bn]
        self.lower = make_optimizer(o.optimizer, self.params, o.lr, o.momentum, o.wd, foreach=False)
        self.upper = make_optimizer("sgd", self.params, b.mask_lr, o.momentum, o.wd, foreach=False)
        self.optimizers = {"lower": self.lower, "upper": self.upper}
        self.refresh()
        self._start_monitor(model, rule="reference")

    def refresh(self) -> None:
        masking.refresh_masks(self.core, self.cfg.prune.k, rule="reference")

    def on_epoch_start(self, epoch: int) -> None:
        o, epochs = self.cfg.optim, self.epochs()
        set_lr(self.lower, reference_lr(o.lr_schedule, o.lr, epoch, epochs))
        set_lr(self.upper, reference_lr(self.cfg.bip.mask_lr_schedule, o.lr, epoch, epochs))

    def _trainable(self, scores: bool, weights: bool) -> None:
        for p in self.scores:
            p.requires_grad_(scores)
        for p in self.weights:
            p.requires_grad_(weights)
        for p in self.bn:
            p.requires_grad_(True)

    def _pass(self, x: torch.Tensor, y: torch.Tensor):
        with self._no_sync():
            loss, out = self._loss(x, y)
            self._backward(loss, y)
        all_reduce_grads(self.params)
        return loss, out

    def step(self, batches, progress):
        (x_t, y_t), (x_v, y_v) = batches  # T: the "train" loader, V: the second ("val") loader
        # 1. lower level on V: scores frozen.
        self._trainable(scores=False, weights=True)
        self.lower.zero_grad(set_to_none=False)
        self._pass(x_v, y_v)
        self.lower.step()
        self.refresh()
        # 2. full gradient gB on T, everything trainable.
        self._trainable(scores=True, weights=True)
        self.lower.zero_grad(set_to_none=False)
        loss_t, _ = self._pass(x_t, y_t)
        g_full = {p: p.grad.clone() for p in self.params if p.grad is not None}
        # 3. prune gradient gM on the same T, weights and biases frozen.
        self._trainable(scores=True, weights=False)
        self.upper.zero_grad(set_to_none=False)
        self._pass(x_t, y_t)
        # 4. slot-wise "implicit gradient": G = gM + (-lr2 * gM) * gB, in the released code's op
        #    order (another order rounds differently, which channel masks amplify).
        with torch.no_grad():
            for p, g_b in g_full.items():
                if p.grad is not None:
                    p.grad.add_((-self.cfg.bip.lr2 * p.grad) * g_b)
        self.upper.step()
        self.refresh()
        if self.monitor is not None:
            self.monitor.after_refresh()
        # 5. the released code's logging forward (moves BN running statistics once more).
        with torch.no_grad(), self._autocast():
            out = self._forward(x_t)
        return self._stats(loss_t, out, y_t)


class HydraReference(Method):
    """HYDRA as the released BiP code's ``--trainer base`` prune run (module docstring)."""

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__(cfg, model)
        o = cfg.optim
        released_score_init(cfg, model)
        bn = {id(p) for p in bn_parameters(model)}
        scores = masking.all_score_ids(model)
        for p in model.parameters():  # prepare_model(prune): freeze weights and biases
            p.requires_grad_(id(p) in scores or (id(p) in bn and cfg.prune.train_bn))
        self.params = list(model.parameters())
        # Over ALL parameters, as released: a frozen tensor never gets a grad slot, so SGD skips
        # it, but with aliasing its storage moves with the scores.
        self.opt = make_optimizer(o.optimizer, self.params, o.lr, o.momentum, o.wd, foreach=False)
        self.optimizers = {"scores": self.opt}
        masking.refresh_masks(self.core, cfg.prune.k, rule="reference")
        self._start_monitor(model, rule="reference")

    def on_epoch_start(self, epoch: int) -> None:
        o = self.cfg.optim
        set_lr(self.opt, reference_lr(o.lr_schedule, o.lr, epoch, self.epochs()))

    def step(self, batches, progress):
        x, y = batches[0]
        with self._no_sync():
            loss, out = self._loss(x, y)
            self.opt.zero_grad(set_to_none=False)
            self._backward(loss, y)
        all_reduce_grads(self.params)
        self.opt.step()
        masking.refresh_masks(self.core, self.cfg.prune.k, rule="reference")
        if self.monitor is not None:
            self.monitor.after_refresh()
        return self._stats(loss, out, y)
