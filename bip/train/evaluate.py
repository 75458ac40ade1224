"""Evaluation: top-1 / top-5 / loss on the validation and test splits, summed over ranks."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bip.config import Config
from bip.methods.base import autocast
from bip.train.distributed import Ranks


@torch.no_grad()
def evaluate(model, loaders, ranks: Ranks, cfg: Config) -> dict:
    ranks.average_batchnorm_stats(model)
    model.eval()
    out = {}
    for name, batches in (("val", loaders.val), ("test", loaders.test)):
        if batches is None:
            continue
        # Correct, top-5 correct, loss summed on the device in float64 (no per-batch host copy);
        # the sample count is known on the host and joins the sums once, before the all-reduce.
        sums, n = torch.zeros(4, dtype=torch.float64, device=ranks.device), 0
        for x, y in batches():
            with autocast(cfg, ranks.device.type):
                logits = model(x)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = torch.stack([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(1).sum()])
            sums[:2] += hits
            sums[2] += F.cross_entropy(logits.double(), y, reduction="sum")
            n += len(y)
        sums[3] += n
        ranks.all_reduce_sum(sums)
        correct, correct5, loss, n = sums.tolist()
        out.update({f"{name}_acc": 100 * correct / n, f"{name}_top5": 100 * correct5 / n,
                    f"{name}_loss": loss / n})
    model.train()
    return out


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches, limit: int, cfg: Config) -> int:
    """eval.bn_recalibrate: BatchNorm's running statistics re-estimated for the model as it stands
    (the current mask), as the equal-weight average over ``limit`` training batches in train mode
    (momentum None); weights, scores and masks are untouched. Returns the examples forwarded."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or limit <= 0:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    was_training, n = model.training, 0
    model.train()
    try:
        for i, (x, _) in enumerate(batches):
            if i >= limit:
                break
            with autocast(cfg, x.device.type):
                model(x)
            n += len(x)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(was_training)
    return n
