"""Parameter and MAC accounting of a (masked) model.

Effective counts use the masks the forward uses: a conv's effective MACs are its kept weights
times its output positions (for groups = 1), the density-times-MACs convention of RigL. It lives
with the models because it must know the zoo's attention wrapper (bip.models.swap), whose
projections run inside the attention kernel rather than through their own forward.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bip.models.swap import MaskedMultiheadAttention
from bip.pruning.layers import MaskedLayer


@torch.no_grad()
def count_params_and_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, int]:
    return macs_from_positions(model, layer_positions(model, input_shape))


@torch.no_grad()
def layer_positions(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[int, int]:
    """{id(conv / linear module): output positions per sample} from one eval forward of a zero
    batch of one (masks do not change positions, so a training run measures them once)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    attention = [m for m in model.modules() if isinstance(m, MaskedMultiheadAttention)]
    positions: dict[int, int] = {}

    def record(module, _inputs, output):
        # conv: output pixels; linear: tokens (1 for a flat vector, L for a sequence)
        positions[id(module)] = output[0, 0].numel() if isinstance(module, nn.Conv2d) \
            else output[0].numel() // output.shape[-1]

    def record_attention(module, _inputs, output):
        # Its projections run inside the attention kernel, not through their forward: one
        # token count for both (exact for self-attention, the ViT case).
        out = output[0] if module.batch_first else output[0].transpose(0, 1)
        positions[id(module.in_proj)] = positions[id(module.out_proj)] = out[0].numel() // out.shape[-1]

    handles = [m.register_forward_hook(record) for m in layers]
    handles += [m.register_forward_hook(record_attention) for m in attention]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return positions


@torch.no_grad()
def macs_from_positions(model: nn.Module, positions: dict[int, int]) -> dict[str, int]:
    """Parameter and MAC counts, dense and effective (the masks as they are now; reads the
    mask counts, so it waits for the device: not for the hot path)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    kept_of = {id(m): int(m.mask.count_nonzero()) for m in layers if isinstance(m, MaskedLayer)}
    params_dense = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("scores"))
    pruned = sum(m.weight.numel() - kept_of[id(m)] for m in layers if id(m) in kept_of)
    macs_dense = sum(m.weight.numel() * positions.get(id(m), 0) for m in layers)
    macs_effective = sum(kept_of.get(id(m), m.weight.numel()) * positions.get(id(m), 0) for m in layers)
    return {"params_dense": params_dense, "params_effective": params_dense - pruned,
            "macs_dense": macs_dense, "macs_effective": macs_effective}
