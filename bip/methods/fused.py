"""BiP in one pass (``bip.variant=fused``): both levels' updates from ONE forward/backward.

The paper variant (bip.methods.bilevel.BipPaper) spends two forwards and two backwards per step: the
lower level steps the weights on batch V, then the upper level evaluates g = dL/dZ at the new
weights on batch T. Both updates need only g of the masked layers (Z = W * M): the lower level
uses M * g, the upper level sign(S) * (W * g - (1/gamma) * M * g^2). The fused variant reads ONE
batch per step, runs one forward and one backward through the straight-through autograd function
(bip.pruning.layers._MaskedWeight, with every tensor differentiated) and takes both SGD steps from that
same g at the current weights W_t: the score step uses W_t (not the lower level's W_{t+1}), the
weight step uses M_t * g. Then the mask is recomputed once, as in every other method.

Data: one training stream (``streams = 1``): each example of an epoch is seen once, by both
levels at the same time, so an epoch costs one pass per example (compute accounting: 1).

Under DDP, g is averaged over ranks before the score gradient squares it (bip.methods.gsync.GReducer,
as for the paper variant); the weight gradients are averaged by hand (bip.methods.base.
all_reduce_grads), since the backward also produces the score gradients that DDP's hooks would
wait for. The step is sync-free: no ``.item()`` or host read.
"""
from __future__ import annotations

from bip.methods import gsync
from bip.methods.base import all_reduce_grads
from bip.methods.bilevel import BipPaper
from bip.methods.optim import lr_at, set_lr
from bip.pruning import masking


class BipFused(BipPaper):
    """One-pass BiP: lower (theta: lr alpha, ridge lower_wd) and upper (scores: lr beta,
    upper_wd) SGD steps from one backward on one batch; optimizers, lrs, schedules, gamma and
    score init exactly as in the paper variant (its __init__)."""

    streams = 1

    def step(self, batches, progress):
        (x, y), = batches
        o, b = self.cfg.optim, self.cfg.bip
        factor = lr_at(o.lr_schedule, 1.0, progress, self.epochs(), o.warmup_epochs, 0.0)
        set_lr(self.lower, b.alpha * factor)
        set_lr(self.upper, b.beta * factor)

        self.lower.zero_grad(set_to_none=True)
        self.upper.zero_grad(set_to_none=True)
        sink = gsync.GReducer(self.ig_coeff) if gsync.distributed() else None
        # "all": the backward gives theta's gradients (M * g for masked weights) and the score
        # gradients sign(S) * (W - c * M * g) * g from the same g, at the same W.
        with masking.grad_target(self.core, "all", self.ig_coeff, sink), self._no_sync():
            loss, out = self._loss(x, y)
            self._backward(loss, y)
        all_reduce_grads(self.theta)
        if sink is not None:
            sink.finish()  # reads layer.weight: must run before the weight step moves it
        self._clip_score_steps(self.scores, b.beta * factor)
        self.upper.step()
        self.lower.step()
        self._refresh_masks(progress)
        return self._stats(loss, out, y)
