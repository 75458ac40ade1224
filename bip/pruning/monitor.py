"""What the masks and scores of a score-based run do while it trains (``run.diagnostics``).

At 98-99 % sparsity a learned mask can end below the magnitude mask it started from; these
fields show how (docs/experiments/2026-12-08-high-sparsity.md). Every epoch row of a run that
trains scores (BiP and HYDRA, every variant) gets, in ``epoch`` mode:

- ``mask_churn_epoch`` / ``mask_churn_start``: the fraction of the kept set that is not in the
  kept set of the epoch's start / of the run's first mask at k (the initial scores' top-k);
- ``mask_overlap_magnitude``: the fraction of the kept set that the one-shot magnitude mask of
  the starting weights (OMP's mask, the same k and floor) also keeps;
- ``bn_drift``: the mean over BatchNorm layers of ||running_mean - start|| / ||start|| + the same
  for running_var (how far the statistics that evaluation uses moved);
- ``mask_layers``: per masked layer [kept, kept by the magnitude mask, score step ratio].

``step`` mode adds per-step device sums (no host read in the step): ``mask_churn_step``, the
mean over steps of the fraction of the kept set replaced by one mask refresh, and
``score_step_ratio``, the mean over steps of ||S_t - S_{t-1}|| / ||S_{t-1}|| over all scores
(per layer in ``mask_layers``). It keeps a copy of the scores and masks (memory: one model).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bip.pruning import masking

MODES = ("none", "epoch", "step")


@torch.no_grad()
def magnitude_masks(model: nn.Module, k: float, rule: str = "nearest") -> list[torch.Tensor]:
    """The masks that a one-shot magnitude prune of the current weights would give (the same
    plan: scope, floor, skip), without changing the model's scores or masks."""
    layers = [m for _, m in masking.plan(model).layers if m.is_pruned]
    saved = [(m.scores.detach().clone(), m.mask.clone()) for m in layers]
    for m in layers:
        m.scores.copy_(m.weight.detach())
    masking.refresh_masks(model, k, rule)
    out = [m.mask.clone() for m in layers]
    for m, (s, mask) in zip(layers, saved):
        m.scores.copy_(s)
        m.mask.copy_(mask)
    return out


def _bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]


class MaskMonitor:
    """Built when the method has set its first mask, before a checkpoint is restored (so the
    start and magnitude masks are the run's, also after a resume)."""

    def __init__(self, model: nn.Module, k: float, mode: str, rule: str = "nearest"):
        self.model, self.mode = model, mode
        named = [(n, m) for n, m in masking.plan(model).layers if m.is_pruned]
        self.names, self.layers = [n for n, _ in named], [m for _, m in named]
        self.start = [m.mask.clone() for m in self.layers]
        self.magnitude = magnitude_masks(model, k, rule)
        self.bn = _bn_layers(model)
        self.bn_start = [(b.running_mean.clone(), b.running_var.clone()) for b in self.bn]
        self.epoch_start = [m.mask.clone() for m in self.layers]
        device = self.start[0].device if self.start else torch.device("cpu")
        n = len(self.layers)
        # Step sums: [steps, churn], and per layer score step ratios (float64 on the device).
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)
        self.ratio = torch.zeros(n, dtype=torch.float64, device=device)
        self.prev_scores = self.prev_masks = None
        if mode == "step":
            self.prev_scores = [m.scores.detach().clone() for m in self.layers]
            self.prev_masks = [m.mask.clone() for m in self.layers]

    @torch.no_grad()
    def after_refresh(self) -> None:
        """After the step's mask refresh: add this step's churn and score step (device ops)."""
        if self.prev_scores is None:
            return
        changed = kept = None
        for i, m in enumerate(self.layers):
            s, prev = m.scores.detach(), self.prev_scores[i]
            step = torch.linalg.vector_norm((s - prev).double())
            self.ratio[i] += step / torch.linalg.vector_norm(prev.double()).clamp_min(1e-30)
            diff = (m.mask != self.prev_masks[i]).sum()
            n = m.mask.sum()
            changed = diff if changed is None else changed + diff
            kept = n if kept is None else kept + n
            prev.copy_(s)
            self.prev_masks[i].copy_(m.mask)
        self.sums[0] += 1
        # |M_t xor M_{t-1}| / 2 weights left and as many entered: replaced / kept.
        self.sums[1] += changed.double() / (2 * kept.double().clamp_min(1))

    @torch.no_grad()
    def epoch_fields(self) -> dict:
        """The epoch row's fields; starts the next epoch's sums (reads the device: epoch ends)."""
        masks = [m.mask for m in self.layers]
        kept = sum(int(m.sum()) for m in masks)

        def lost(reference: list[torch.Tensor]) -> float:
            both = sum(int((m & r).sum()) for m, r in zip(masks, reference))
            return round(1 - both / kept, 6) if kept else 0.0

        row = {"mask_churn_epoch": lost(self.epoch_start), "mask_churn_start": lost(self.start),
               "mask_overlap_magnitude": round(1 - lost(self.magnitude), 6),
               "bn_drift": round(self._bn_drift(), 6)}
        steps = float(self.sums[0])
        ratios = (self.ratio / max(steps, 1.0)).tolist()
        if self.mode == "step" and steps:
            row["mask_churn_step"] = round(float(self.sums[1]) / steps, 8)
            # size-weighted: each layer's ratio times its share of ||S|| (the global ratio).
            norms = [float(torch.linalg.vector_norm(m.scores.detach().double())) for m in self.layers]
            row["score_step_ratio"] = round(sum(r * n for r, n in zip(ratios, norms)) / max(sum(norms), 1e-30), 8)
        row["mask_layers"] = {
            name: [int(m.sum()), int(mag.sum())] + ([round(r, 8)] if self.mode == "step" else [])
            for name, m, mag, r in zip(self.names, masks, self.magnitude, ratios)}
        for m, e in zip(masks, self.epoch_start):
            e.copy_(m)
        self.sums.zero_()
        self.ratio.zero_()
        return row

    def _bn_drift(self) -> float:
        if not self.bn:
            return 0.0
        total = 0.0
        for b, (mean0, var0) in zip(self.bn, self.bn_start):
            for now, start in ((b.running_mean, mean0), (b.running_var, var0)):
                total += float(torch.linalg.vector_norm(now - start) / torch.linalg.vector_norm(start).clamp_min(1e-12))
        return total / len(self.bn)

    # resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"epoch_start": self.epoch_start, "sums": self.sums, "ratio": self.ratio}
        if self.prev_scores is not None:
            state.update(prev_scores=self.prev_scores, prev_masks=self.prev_masks)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for dst, src in zip(self.epoch_start, state["epoch_start"]):
            dst.copy_(src)
        self.sums.copy_(state["sums"])
        self.ratio.copy_(state["ratio"])
        if self.prev_scores is not None and "prev_scores" in state:
            for dst, src in zip(self.prev_scores + self.prev_masks, state["prev_scores"] + state["prev_masks"]):
                dst.copy_(src)
