"""HYDRA (Sehwag et al. 2020): scores train by SGD, the weights stay frozen, the mask is the
top-k of |scores| after every step."""
from __future__ import annotations

import torch.nn as nn

from bip.config import Config
from bip.methods.base import Method, bn_parameters
from bip.methods.optim import make_optimizer
from bip.pruning import masking


class Hydra(Method):
    """HYDRA: scores (and BN affine, prune.train_bn) train by SGD; weights stay frozen."""

    def __init__(self, cfg: Config, model: nn.Module):
        super().__init__(cfg, model)
        self._start_masks(model)
        self.scores = masking.score_parameters(model)
        trained = {id(p) for p in self.scores}
        if cfg.prune.train_bn:
            trained |= {id(p) for p in bn_parameters(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
        o = cfg.optim
        self.opt = make_optimizer(o.optimizer, [p for p in model.parameters() if p.requires_grad],
                                  o.lr, o.momentum, o.wd, o.nesterov)
        self.optimizers = {"scores": self.opt}

    def step(self, batches, progress):
        lr = self._lr(progress)
        stats = self._sgd_step(self.opt, batches[0], lr, before_step=lambda: self._clip_score_steps(self.scores, lr))
        self._refresh_masks(progress)
        return stats
