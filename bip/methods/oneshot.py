"""One-shot masks (OMP by global magnitude, random); the run trains nothing."""
from __future__ import annotations

import torch
import torch.nn as nn

from bip.config import Config
from bip.methods.base import Method
from bip.pruning import masking


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
