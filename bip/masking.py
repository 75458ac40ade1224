"""Keep budgets, mask computation, score initialisation and the sparsity report.

Kept counts (k = fraction KEPT):
- unstructured: ONE global top-k over the |scores| of every masked conv and linear weight;
  per-layer densities are free. Kept = round(k * N), N = all masked weights.
- filter / channel: per masked layer, the round(k * n) filters (output channels; a linear
  layer's output rows) / input channels (input columns) with the largest L2 norm of |scores|
  are kept, n = filters / channels of that layer, at least one per layer.
round(x) is floor(x + 1/2). The ``reference`` count rule reproduces the released code instead:
it zeroes floor((1 - k) * n) units (computed in double), e.g. k = 0.8, n = 10 keeps 9.
Ties at the threshold are broken deterministically: the earlier position (in the flat order of
the model's named modules) is kept.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn as nn

from bip.layers import MaskedLayer


def masked_layers(model: nn.Module) -> list[tuple[str, MaskedLayer]]:
    """Masked layers in named_modules order (the order of the global ranking)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MaskedLayer)]


def keep_count(k: float, n: int, rule: str = "nearest") -> int:
    """How many of ``n`` units a keep ratio ``k`` keeps (module docstring)."""
    if k >= 1.0:
        return n
    if rule == "reference":
        return n - int((1.0 - k) * n)
    return min(n, max(1, math.floor(k * n + 0.5)))


def top_mask(values: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Bool mask of the ``n_keep`` largest entries of a 1-D tensor of non-negative values; ties
    at the threshold keep the earlier entries. One selection, never a full sort."""
    n = values.numel()
    if n_keep >= n:
        return torch.ones_like(values, dtype=torch.bool)
    if n_keep <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    threshold = kth_largest(values, n_keep)
    keep = values >= threshold
    excess = int(keep.sum()) - n_keep
    if excess > 0:  # ties at the threshold: drop the latest of them
        tied = (values == threshold).nonzero().squeeze(1)
        keep[tied[-excess:]] = False
    return keep


_BUCKET_BITS = 16


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of a 1-D tensor of non-negative floats.

    Non-negative IEEE floats order like their bit patterns, so one bincount over the top 16 bits
    finds the bucket that holds the answer, and kthvalue runs only inside that bucket (about 1%
    of the entries): 3-4x faster than kthvalue over all 11M scores of a ResNet-18 on CPU.
    """
    n = values.numel()
    if n < 1 << _BUCKET_BITS or values.dtype not in (torch.float32, torch.float64):
        return torch.kthvalue(values, n - k + 1).values
    int_type, width = (torch.int32, 32) if values.dtype == torch.float32 else (torch.int64, 64)
    bucket = values.view(int_type) >> (width - 1 - _BUCKET_BITS)  # sign bit is 0: 0 .. 2^16-1
    counts = torch.bincount(bucket, minlength=1 << _BUCKET_BITS)
    at_or_above = counts.flip(0).cumsum(0).flip(0)  # entries in this bucket or a higher one
    b = int((at_or_above >= k).nonzero().max())
    above = int(at_or_above[b + 1]) if b + 1 < len(counts) else 0
    candidates = values[bucket == b]
    return torch.kthvalue(candidates, candidates.numel() - (k - above) + 1).values


def _unit_norms(layer: MaskedLayer) -> torch.Tensor:
    """L2 norm of |scores| per filter (dim 0) or per input channel (dim 1)."""
    a = layer.scores.detach().abs()
    if layer.granularity == "channel":
        a = a.transpose(0, 1)
    return a.flatten(1).norm(dim=1)


@torch.no_grad()
def refresh_masks(model: nn.Module, k: float, rule: str = "nearest") -> None:
    """Recompute every mask from the current scores. Called once per optimizer step."""
    layers = [m for _, m in masked_layers(model)]
    if not layers:
        return
    global_layers = [m for m in layers if m.granularity == "unstructured"]
    if global_layers:
        sizes = [m.mask.numel() for m in global_layers]
        scores = global_layers[0].scores
        flat = torch.empty(sum(sizes), dtype=scores.dtype, device=scores.device)
        for m, part in zip(global_layers, flat.split(sizes)):
            torch.abs(m.scores.detach().reshape(-1), out=part)
        keep = top_mask(flat, keep_count(k, flat.numel(), rule))
        for m, part in zip(global_layers, keep.split(sizes)):
            m.mask.copy_(part.view_as(m.mask))
    for m in layers:
        if m.granularity == "unstructured":
            m.mask_version += 1
            continue
        norms = _unit_norms(m)
        keep = top_mask(norms, keep_count(k, norms.numel(), rule))
        shape = [1] * m.mask.dim()  # conv (4-D) and linear (2-D) weights alike
        shape[0 if m.granularity == "filter" else 1] = -1
        m.mask.copy_(keep.view(shape).expand_as(m.mask))
        m.mask_version += 1


@torch.no_grad()
def init_scores(model: nn.Module, how: str) -> None:
    """Score initialisation for pruning; scores never share memory with weights here.

    magnitude: S = W (the first mask is global magnitude pruning). hydra: S = sqrt(6/fan_in) *
    W / max|W| per layer (HYDRA's scaled init). kaiming: Kaiming-uniform, as a fresh weight.
    """
    for _, m in masked_layers(model):
        w = m.weight.detach()
        if how == "magnitude":
            m.scores.copy_(w)
        elif how == "hydra":
            fan_in = w[0].numel()
            m.scores.copy_(math.sqrt(6.0 / fan_in) * w / w.abs().max().clamp_min(1e-12))
        elif how == "kaiming":
            nn.init.kaiming_uniform_(m.scores, a=math.sqrt(5))
        else:
            raise ValueError(f"unknown score init {how!r}")


def alias_scores_to_weights(model: nn.Module) -> None:
    """Reference variant only: scores and weights become ONE storage (the released code's
    --scaled-score-init rebinding), so an update of either moves both."""
    for _, m in masked_layers(model):
        m.scores.data = m.weight.data


@contextlib.contextmanager
def grad_target(model: nn.Module, target: str, ig_coeff: float = 0.0) -> Iterator[None]:
    """Within the block, masked layers differentiate only ``target`` ("weights"/"scores")."""
    layers = [m for _, m in masked_layers(model)]
    for m in layers:
        m.grad_target, m.ig_coeff = target, ig_coeff
    try:
        yield
    finally:
        for m in layers:
            m.grad_target, m.ig_coeff = "all", 0.0


@torch.no_grad()
def zero_pruned_weights(model: nn.Module) -> None:
    """W <- W * M, so that pruned weights are exactly zero (finetune keeps them there)."""
    for _, m in masked_layers(model):
        m.weight.mul_(m.mask)


@torch.no_grad()
def sparsity_report(model: nn.Module) -> dict:
    """Kept counts measured from the masks the forward uses, overall and per layer.

    ``kept_fraction`` counts units (weights for unstructured, filters/channels for structured)
    and is what k controls; ``weight_kept_fraction`` counts weights over ALL conv and linear
    layers, dense ones included.
    """
    per_layer, units_kept, units_total = {}, 0, 0
    masked_ids = set()
    for name, m in masked_layers(model):
        masked_ids.add(id(m))
        mask = m.mask
        if m.granularity == "unstructured":
            kept, total = int(mask.count_nonzero()), mask.numel()
        else:
            dim = 0 if m.granularity == "filter" else 1
            unit_alive = mask.transpose(0, dim).flatten(1).any(dim=1)
            kept, total = int(unit_alive.sum()), unit_alive.numel()
        per_layer[name] = {"kept": kept, "total": total, "kept_fraction": kept / total,
                           "weights_kept": int(mask.count_nonzero()), "weights": mask.numel(),
                           "granularity": m.granularity}
        units_kept, units_total = units_kept + kept, units_total + total
    weights_kept = weights_total = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            n = m.weight.numel()
            weights_total += n
            weights_kept += int(m.mask.count_nonzero()) if id(m) in masked_ids else n
    return {
        "kept": units_kept, "total": units_total,
        "kept_fraction": units_kept / units_total if units_total else 1.0,
        "weights_kept": weights_kept, "weights_total": weights_total,
        "weight_kept_fraction": weights_kept / weights_total if weights_total else 1.0,
        "layers": per_layer,
    }
