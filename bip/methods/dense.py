"""Pretrain and finetune: plain SGD on every unmasked tensor (the mask stays fixed)."""
from __future__ import annotations

import torch.nn as nn

from bip.config import Config
from bip.methods.base import Method
from bip.methods.optim import make_optimizer
from bip.pruning import masking


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
