"""Keep budgets, mask computation, score initialisation and the sparsity report.

Kept counts (k = fraction KEPT; units are weights for unstructured / nm, filters (output rows)
or input channels (columns) for filter / channel, in conv and linear layers alike):
- unstructured, ``prune.scope=global`` (BiP): ONE top-k over the |scores| of every pruned
  weight; per-layer densities are free. Kept = round(k * N), N = all pruned weights.
- unstructured, ``prune.scope=layer`` (HYDRA's original): round(k * n) in every layer.
- filter / channel: per layer, the round(k * n) units with the largest L2 norm of |scores|.
- nm: in every group of M consecutive weights along the input dimension, the N largest |scores|
  (Linear: along in_features; conv: along input channels at each kernel position, the weight
  viewed as [out, kh, kw, in]); k is N/M. Layers whose input size is not a multiple of M stay
  dense and are listed in the sparsity report.
round(x) is floor(x + 1/2), at least 1 unit per layer for per-layer budgets. The ``reference``
count rule reproduces the released code instead: it zeroes floor((1 - k) * n) units (computed
in double), e.g. k = 0.8, n = 10 keeps 9.

Options (``configure``, from PruneConfig): ``skip`` leaves layers dense (not masked, not in N:
k counts the pruned layers only); ``min_layer_keep`` (global scope) always keeps the top
ceil(f * n) (f < 1) or min(f, n) (f >= 1) units of every layer, taken out of the global budget,
so the total stays round(k * N) (a floor above the budget is an error).

Order: larger |score| first; NaN and +-inf scores rank below every finite score; ties: the
earlier position (flat order of the model's named modules) wins. The mask update is device ops
only (bip.pruning.topk): the training step never waits for the host.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from bip.pruning import topk
from bip.errors import BipError
from bip.pruning.layers import MaskedLayer


def masked_layers(model: nn.Module) -> list[tuple[str, MaskedLayer]]:
    """Masked layers in named_modules order (the order of the global ranking). Rediscovered on
    every call: for reports and setup; the per-step code uses the cached plan."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MaskedLayer)]


def keep_count(k: float, n: int, rule: str = "nearest") -> int:
    """How many of ``n`` units a keep ratio ``k`` keeps (module docstring)."""
    if k >= 1.0:
        return n
    if rule == "reference":
        return n - int((1.0 - k) * n)
    return min(n, max(1, math.floor(k * n + 0.5)))


def floor_count(f: float, n: int) -> int:
    """Units of an n-unit layer that ``min_layer_keep = f`` always keeps."""
    if f <= 0:
        return 0
    return min(n, math.ceil(f * n - 1e-9) if f < 1 else int(f))


@dataclass(frozen=True)
class Options:
    """How the budget is spread; the model-level part of PruneConfig."""
    scope: str = "global"
    min_layer_keep: float = 0.0
    skip: tuple[str, ...] = ()
    n: int = 2
    m: int = 4
    hysteresis: float = 0.0   # a kept weight's |score| counts (1 + h) times in the next ranking


class Plan:
    """A model's masked layers, grouped by how their masks are chosen, with the selection
    workspace. Built once per model (``plan``); rebuilt by ``configure`` or ``forget``."""

    def __init__(self, model: nn.Module, options: Options):
        self.options = options
        self.layers = masked_layers(model)
        pruned = [(n, m) for n, m in self.layers if m.is_pruned]
        self.unstructured = [m for _, m in pruned if m.granularity == "unstructured"]
        self.structured = [m for _, m in pruned if m.granularity in ("filter", "channel")]
        self.nm = [m for _, m in pruned if m.granularity == "nm"]
        self.elementwise = self.unstructured + self.nm   # |scores| go into one flat buffer
        # Each layer's keys fill a segment padded to a multiple of topk.CHUNK (the radix select
        # views them as chunks); padding holds topk.PAD, which ranks last and is never kept.
        self.sizes = [m.mask.numel() for m in self.elementwise]
        self.segments = [topk.padded(n) for n in self.sizes]
        u = len(self.unstructured)
        self.n_unstructured = sum(self.sizes[:u])
        self.unstructured_span = sum(self.segments[:u])
        self.floors = [floor_count(options.min_layer_keep, n) for n in self.sizes[:u]]
        self._ws: tuple | None = None
        self._unit_budgets: dict = {}  # (k, rule, device) -> per-layer kept units, on the device

    def workspace(self) -> tuple[torch.Tensor, torch.Tensor, topk.TopK]:
        """(flat keys, flat keep, TopK) for the current device / dtype of the scores."""
        s = self.elementwise[0].scores
        dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
        if self._ws is None or self._ws[0].device != s.device or self._ws[0].dtype != dtype:
            n = sum(self.segments)
            capacity = max(self.segments) if self.options.scope == "layer" else self.unstructured_span
            self._ws = (torch.full((n,), topk.PAD, dtype=dtype, device=s.device),
                        torch.zeros(n, dtype=torch.bool, device=s.device),
                        topk.TopK(capacity, dtype, s.device))
        return self._ws

    @torch.no_grad()
    def refresh(self, k: float, rule: str) -> None:
        if self.elementwise:
            self._refresh_elementwise(k, rule)
        if self.structured:
            self._refresh_structured(k, rule)

    def _refresh_elementwise(self, k: float, rule: str) -> None:
        flat, keep, sel = self.workspace()
        keys, kept = flat.split(self.segments), keep.split(self.segments)
        for m, key, n in zip(self.elementwise, keys, self.sizes):
            # Written through a view in the scores' logical shape: the keys are in NCHW order
            # (the tie order) even for channels_last scores (bip.train.compile), with no copy.
            torch.abs(m.scores.detach(), out=key[:n].view(m.scores.shape))
            if self.options.hysteresis:  # damping: a weight must beat a kept one by a margin
                k_view = key[:n].view(m.scores.shape)
                k_view.addcmul_(k_view, m.mask, value=self.options.hysteresis)
        topk.rank_keys_(flat)
        u = len(self.unstructured)
        if u:
            self._select_unstructured(k, rule, keys[:u], kept[:u], sel)
        for m, key, out, n in zip(self.nm, keys[u:], kept[u:], self.sizes[u:]):
            group = m.nm[1]
            topk.nm_keep(_nm_view(key[:n].view_as(m.mask), group), m.nm[0],
                         _nm_view(out[:n].view_as(m.mask), group))
        for m, out, n in zip(self.elementwise, kept, self.sizes):
            m.mask.copy_(out[:n].view_as(m.mask))

    def _select_unstructured(self, k, rule, keys, kept, sel) -> None:
        if self.options.scope == "layer":
            for key, out, n in zip(keys, kept, self.sizes):
                sel.select(key, keep_count(k, n, rule), out)
            return
        budget = keep_count(k, self.n_unstructured, rule)
        if any(self.floors):
            if sum(self.floors) > budget:
                raise BipError(f"prune.min_layer_keep={self.options.min_layer_keep} keeps "
                               f"{sum(self.floors)} weights, more than the budget round(k * N) = "
                               f"{budget} at k={k}: lower the floor or raise k")
            # Each layer's floor ranks above everything (+inf), then one global top-k.
            for key, out, f in zip(keys, kept, self.floors):
                if f:
                    key.masked_fill_(sel.select(key, f, out), math.inf)
        span = self.unstructured_span
        flat, keep, _ = self.workspace()
        sel.select(flat[:span], budget, keep[:span])

    def _refresh_structured(self, k: float, rule: str) -> None:
        norms = [_unit_norms(m) for m in self.structured]
        keys = topk.rank_keys_(nn.utils.rnn.pad_sequence(norms, batch_first=True, padding_value=topk.PAD))
        n_keep = self._unit_budgets.get((k, rule, keys.device))
        if n_keep is None:  # built once per k: no host-to-device copy in the step
            n_keep = torch.tensor([keep_count(k, v.numel(), rule) for v in norms], device=keys.device)
            self._unit_budgets[(k, rule, keys.device)] = n_keep
        kept = topk.top_rows(keys, n_keep)
        for i, (m, v) in enumerate(zip(self.structured, norms)):
            m.mask.copy_(kept[i, :v.numel()].view(_unit_shape(m)).expand_as(m.mask))


def _unit_norms(layer: MaskedLayer) -> torch.Tensor:
    """L2 norm of |scores| per filter (dim 0: output row) or per input channel (dim 1)."""
    a = layer.scores.detach().abs()
    if layer.granularity == "channel":
        a = a.transpose(0, 1)
    return a.flatten(1).norm(dim=1)


def _unit_shape(layer: MaskedLayer) -> tuple[int, ...]:
    rest = (1,) * (layer.mask.dim() - 2)
    return (-1, 1) + rest if layer.granularity == "filter" else (1, -1) + rest


def _nm_view(t: torch.Tensor, m: int) -> torch.Tensor:
    """[out, in, *kernel] -> [out, in / m, m, kernel positions]: groups of m along dim -2."""
    return t.view(t.shape[0], t.shape[1] // m, m, -1)


def nm_dense_reason(layer: MaskedLayer, m: int) -> str:
    """Why an nm layer stays dense ('' if it is pruned)."""
    n_in = layer.weight.shape[1]
    return "" if n_in % m == 0 else f"input size {n_in} is not a multiple of m={m}"


_PLANS: "weakref.WeakKeyDictionary[nn.Module, Plan]" = weakref.WeakKeyDictionary()


def plan(model: nn.Module) -> Plan:
    """The model's cached plan (default options unless ``configure`` was called)."""
    p = _PLANS.get(model)
    if p is None:
        p = _PLANS[model] = Plan(model, Options())
    return p


def forget(model: nn.Module) -> None:
    """Drop the cached plan: call after adding or removing masked layers."""
    _PLANS.pop(model, None)


def options_from(prune) -> Options:
    """Options from a PruneConfig."""
    skip = tuple(s for s in prune.skip.split(",") if s) if prune.skip else ()
    return Options(prune.scope, prune.min_layer_keep, skip, prune.n, prune.m, prune.hysteresis)


def ramp_k(k: float, progress: float, ramp_epochs: float) -> float:
    """The keep ratio at ``progress`` epochs of a sparsity ramp (prune.ramp_epochs): from 1
    (dense) to k along Zhu & Gupta's cubic, k_t = k + (1 - k)(1 - t / T)^3, k after T epochs.
    The mask then keeps exactly keep_count(k_t, N) weights (module docstring)."""
    if ramp_epochs <= 0 or progress >= ramp_epochs:
        return k
    return k + (1.0 - k) * (1.0 - progress / ramp_epochs) ** 3


@torch.no_grad()
def configure(model: nn.Module, prune) -> Plan:
    """Apply a PruneConfig's layer options to ``model`` (which layers stay dense, N:M group
    sizes) and cache its plan. Layers left dense get an all-ones mask and never change."""
    options = options_from(prune)
    layers = dict(masked_layers(model))
    skipped = skipped_layers(model, options.skip)
    for name, m in layers.items():
        m.nm = (options.n, options.m)
        m.prunable = name not in skipped
        if not m.is_pruned:
            m.mask.fill_(True)
    nm = [m for m in layers.values() if m.granularity == "nm" and m.prunable]
    if nm and not any(m.is_pruned for m in nm):  # every layer dense: nothing to prune (k would lie)
        sizes = sorted({m.weight.shape[1] for m in nm})
        shown = ", ".join(map(str, sizes[:8])) + (", ..." if len(sizes) > 8 else "")
        raise BipError(f"prune.m={options.m} leaves every layer dense: no layer's input size ({shown}) "
                       f"is a multiple of m; choose an m that divides them")
    p = _PLANS[model] = Plan(model, options)
    budget = keep_count(prune.k, p.n_unstructured)
    if options.scope == "global" and sum(p.floors) > budget:
        raise BipError(f"prune.min_layer_keep={options.min_layer_keep} keeps {sum(p.floors)} weights, "
                       f"more than the budget round(k * N) = {budget} at k={prune.k}")
    return p


def resolve_skip(model: nn.Module, skip: tuple[str, ...]) -> set[str]:
    """Module names that ``prune.skip`` leaves dense: ``first`` / ``last`` (= ``classifier``) is
    the first / last conv or linear layer in registration order; any other entry names a module."""
    convs = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    out = set()
    for entry in skip:
        if entry == "first" and convs:
            out.add(convs[0])
        elif entry in ("last", "classifier") and convs:
            out.add(convs[-1])
        elif entry in convs:
            out.add(entry)
        else:
            shown = ", ".join(convs[:8]) + (", ..." if len(convs) > 8 else "")
            raise BipError(f"prune.skip: no conv or linear layer named {entry!r}; use first, last, "
                           f"classifier or a layer name ({shown})")
    return out


def skipped_layers(model: nn.Module, skip: tuple[str, ...]) -> set[str]:
    """``resolve_skip``, refusing a spelling other than the canonical one (``skip_spelling``):
    bip.config.names.canonical_skip gives built-in archs that spelling before their run id is
    computed; a tv:/timm: model's ends are only known once it is built, so its config must use it."""
    skipped = resolve_skip(model, skip)
    spelling = skip_spelling(model, skipped)
    if spelling != ",".join(sorted(set(skip))):
        raise BipError(f"prune.skip={','.join(skip)!r} selects the layers that prune.skip={spelling!r} "
                       "names: write it that way (one spelling per model keeps one run id)")
    return skipped


def skip_spelling(model: nn.Module, selected: set[str]) -> str:
    """The canonical ``prune.skip`` text of a set of layer names (bip.config.names.canonical_skip,
    which knows the built-in models' ends): ``first`` and ``classifier`` for the first and last
    conv / linear layer, module names otherwise, sorted."""
    convs = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    ends = {convs[-1]: "classifier", convs[0]: "first"} if convs else {}  # one layer: first
    return ",".join(sorted({ends.get(name, name) for name in selected}))


def refresh_masks(model: nn.Module, k: float, rule: str = "nearest") -> None:
    """Recompute every mask from the current scores. Called once per optimizer step."""
    p = plan(model)
    if p.layers:
        p.refresh(k, rule)


def score_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The scores that train: those of pruned (not dense-kept) layers, in plan order."""
    return [m.scores for _, m in plan(model).layers if m.is_pruned]


def all_score_ids(model: nn.Module) -> set[int]:
    """ids of every masked layer's scores (pruned or not): never trained as weights."""
    return {id(m.scores) for _, m in masked_layers(model)}


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
def grad_target(model: nn.Module, target: str, ig_coeff: float = 0.0, sink=None) -> Iterator[None]:
    """Within the block, masked layers differentiate only ``target`` ("weights"/"scores").
    ``sink`` (bip.methods.gsync.GReducer): the pruned layers hand g = dL/dZ to it instead of forming
    the score gradient themselves (BiP under DDP: g is averaged over ranks first)."""
    layers = [m for _, m in plan(model).layers]
    for m in layers:
        m.grad_target, m.ig_coeff = target, ig_coeff
        m.g_sink = sink if m.is_pruned else None
    try:
        yield
    finally:
        for m in layers:
            m.grad_target, m.ig_coeff, m.g_sink = "all", 0.0, None


@torch.no_grad()
def zero_pruned_weights(model: nn.Module) -> None:
    """W <- W * M, so that pruned weights are exactly zero (finetune keeps them there)."""
    for _, m in masked_layers(model):
        m.weight.mul_(m.mask)


def unit_counts(layer: MaskedLayer) -> tuple[torch.Tensor, int]:
    """(kept units as a 0-d device tensor, total units) of one layer, from its mask."""
    mask = layer.mask
    if layer.granularity in ("filter", "channel"):
        dim = 0 if layer.granularity == "filter" else 1
        alive = mask.transpose(0, dim).flatten(1).any(dim=1)
        return alive.sum(), alive.numel()
    return mask.sum(), mask.numel()


@torch.no_grad()
def sparsity_report(model: nn.Module) -> dict:
    """Kept counts measured from the masks the forward uses, overall and per layer.

    ``kept_fraction`` counts units of the pruned layers (weights for unstructured / nm,
    filters/channels for structured) and is what k controls; ``weight_kept_fraction`` counts
    weights over ALL conv and linear layers, dense ones included. ``dense_layers``: masked-type
    layers left dense (prune.skip, or an nm layer whose input is not a multiple of M) and why;
    ``nm_uncovered_params`` (nm runs): the weights of the latter, which the N:M pattern leaves dense.
    """
    per_layer, dense, units_kept, units_total = {}, {}, 0, 0
    masked_ids = set()
    for name, m in masked_layers(model):
        masked_ids.add(id(m))
        kept, total = unit_counts(m)
        kept = int(kept)
        entry = {"kept": kept, "total": total, "kept_fraction": kept / total,
                 "weights_kept": int(m.mask.count_nonzero()), "weights": m.mask.numel(),
                 "granularity": m.granularity}
        if not m.is_pruned:
            dense[name] = "prune.skip" if not m.prunable else nm_dense_reason(m, m.nm[1])
            entry.update(granularity="dense", reason=dense[name])
        else:
            units_kept, units_total = units_kept + kept, units_total + total
        per_layer[name] = entry
    weights_kept = weights_total = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            n = m.weight.numel()
            weights_total += n
            weights_kept += int(m.mask.count_nonzero()) if id(m) in masked_ids else n
    out = {
        "kept": units_kept, "total": units_total,
        "kept_fraction": units_kept / units_total if units_total else 1.0,
        "weights_kept": weights_kept, "weights_total": weights_total,
        "weight_kept_fraction": weights_kept / weights_total if weights_total else 1.0,
        "dense_layers": dense, "layers": per_layer,
    }
    nm = [m for _, m in masked_layers(model) if m.granularity == "nm"]
    if nm:  # weights the N:M pattern could not cover (dense for want of input size, not skipped)
        out["nm_uncovered_params"] = sum(m.weight.numel() for m in nm if m.prunable and not m.is_pruned)
    return out
