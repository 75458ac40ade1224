"""Model accounting: dense and effective (mask-aware) parameter and multiply-accumulate counts.

Effective counts use the masks the forward uses: a conv's effective MACs are its kept weights
times its output positions (for groups = 1), the density-times-MACs convention of RigL.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bip.layers import MaskedLayer


@torch.no_grad()
def count_params_and_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, int]:
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    positions: dict[int, int] = {}

    def record(module, _inputs, output):
        positions[id(module)] = output[0, 0].numel() if isinstance(module, nn.Conv2d) else 1

    handles = [m.register_forward_hook(record) for m in layers]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    kept_of = {id(m): int(m.mask.count_nonzero()) for m in layers if isinstance(m, MaskedLayer)}
    params_dense = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("scores"))
    pruned = sum(m.weight.numel() - kept_of[id(m)] for m in layers if id(m) in kept_of)
    macs_dense = sum(m.weight.numel() * positions.get(id(m), 0) for m in layers)
    macs_effective = sum(kept_of.get(id(m), m.weight.numel()) * positions.get(id(m), 0) for m in layers)
    return {"params_dense": params_dense, "params_effective": params_dense - pruned,
            "macs_dense": macs_dense, "macs_effective": macs_effective}
