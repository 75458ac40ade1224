"""Layer collapse: pruned layers left with 0 kept units, and networks cut from their input.

At extreme sparsity a global top-k can move a layer's whole budget elsewhere; once the first
conv or the classifier keeps nothing, the output no longer depends on the input and training can
never recover (the run still ends at chance accuracy). This module reports it:

- ``kept_units``: per pruned layer, the kept units (weights for unstructured / nm, filters or
  channels for structured) as ONE device tensor, computed from the masks without a host sync.
- ``empty_layers``: names of the pruned layers with 0 kept units (reads the counts: logging time).
- ``disconnected``: does the network's output still depend on its input? Decided by evaluating
  the function, not by a layer graph: two independent random probe inputs (a fixed generator,
  so every rank and every rerun decides the same) through the model in eval mode, and the
  network is disconnected iff the two outputs are bitwise equal. A cut graph always passes this
  test exactly (a pruned weight is an exact zero, so no trace of the input survives, whatever
  conv algorithm runs), and it needs no knowledge of the architecture (residual adds, option-A
  shortcuts, torchvision / timm graphs) that a graph walk would have to model op by op. The
  converse is the functional definition: a network whose surviving paths are all dead (ReLUs
  off) for both random inputs, or whose input dependence is below float resolution, computes a
  constant in floating point and counts as disconnected too.
- ``record``: the per-epoch record ``{"collapsed": bool, "collapsed_layers": [...]}`` and a
  warning line; ``enforce``: with ``prune.on_collapse=fail``, a BipError once it is recorded.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from bip.pruning import masking
from bip.errors import BipError


def kept_units(model: nn.Module) -> torch.Tensor:
    """Kept units of every pruned layer (``pruned_names`` order), on the device, no sync."""
    counts = [masking.unit_counts(m)[0] for _, m in masking.plan(model).layers if m.is_pruned]
    return torch.stack(counts) if counts else torch.zeros(0, dtype=torch.long)


def pruned_names(model: nn.Module) -> list[str]:
    return [name for name, m in masking.plan(model).layers if m.is_pruned]


def empty_layers(model: nn.Module) -> list[str]:
    """Pruned layers with 0 kept units (a host read: call it when logging)."""
    counts = kept_units(model).tolist()
    return [name for name, kept in zip(pruned_names(model), counts) if kept == 0]


@torch.no_grad()
def disconnected(model: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """True iff the output no longer depends on the input (module docstring)."""
    param = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(2, *input_shape, generator=g).to(param.device, param.dtype)
    was_training = model.training
    model.eval()
    try:
        out = model(probe)
    finally:
        model.train(was_training)
    return bool(torch.equal(out[0], out[1]))


def record(model: nn.Module, input_shape: tuple[int, ...], when: str,
           log: Callable[[str], None] = print) -> dict:
    """The collapse record for metrics.jsonl / result.json, with a warning line if needed
    ({} for a model without masked layers)."""
    if not masking.masked_layers(model):
        return {}
    empty = empty_layers(model)
    cut = disconnected(model, input_shape)
    if cut:
        log(f"warning: {when}: the pruned network is disconnected (its output no longer depends "
            f"on its input); layers with 0 kept units: {', '.join(empty) or 'none'}")
    elif empty:
        log(f"warning: {when}: layers with 0 kept units: {', '.join(empty)} (still connected)")
    return {"collapsed": cut, "collapsed_layers": empty}


def enforce(rec: dict, on_collapse: str, when: str) -> None:
    """``prune.on_collapse=fail``: a disconnected network stops the run with a clear error."""
    if rec.get("collapsed") and on_collapse == "fail":
        raise BipError(f"{when}: the pruned network is disconnected (layers with 0 kept units: "
                       f"{', '.join(rec['collapsed_layers']) or 'none'}); prune.on_collapse=fail. "
                       "Prevent it with prune.min_layer_keep or prune.skip=first,classifier")
