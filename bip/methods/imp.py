"""One IMP round as a Method (the lineage arithmetic is bip/methods/imp_levels.py)."""
from __future__ import annotations

import torch
import torch.nn as nn

from bip.config import Config
from bip.errors import BipError
from bip.methods import imp_levels
from bip.methods.dense import Dense
from bip.pruning import masking


class Imp(Dense):
    """One IMP round (bip/methods/imp_levels.py): from the parent's trained weights and mask, prune by global
    magnitude down to prune.k (at most prune.imp_rate of what the parent kept; pruned weights
    rank last, so masks are nested), rewind to the pretrain's early weights (rewind.pt) and
    retrain for train.epochs with a fresh optimizer."""

    def __init__(self, cfg: Config, model: nn.Module, source: "imp_levels.Source"):
        super().__init__(cfg, model)
        if cfg.train.epochs < 1:
            raise BipError("imp needs train.epochs >= 1 (epochs per round)")
        imp_levels.check_step(cfg.prune.k, cfg.prune.imp_rate, source.density, source.round)
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
