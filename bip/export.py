"""Model accounting: dense and effective (mask-aware) parameter and multiply-accumulate counts.

Effective counts use the masks the forward uses: a conv's effective MACs are its kept weights
times its output positions (for groups = 1), the density-times-MACs convention of RigL.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bip.layers import MaskedLayer
from bip.models.swap import MaskedMultiheadAttention


@torch.no_grad()
def count_params_and_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, int]:
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
    kept_of = {id(m): int(m.mask.count_nonzero()) for m in layers if isinstance(m, MaskedLayer)}
    params_dense = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("scores"))
    pruned = sum(m.weight.numel() - kept_of[id(m)] for m in layers if id(m) in kept_of)
    macs_dense = sum(m.weight.numel() * positions.get(id(m), 0) for m in layers)
    macs_effective = sum(kept_of.get(id(m), m.weight.numel()) * positions.get(id(m), 0) for m in layers)
    return {"params_dense": params_dense, "params_effective": params_dense - pruned,
            "macs_dense": macs_dense, "macs_effective": macs_effective}


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model as a plain dense state dict: every masked weight multiplied by its mask (so
    pruned weights are exactly zero), scores and masks dropped. Loads into the same arch built
    with layer_type=dense."""
    masked = {name for name, m in model.named_modules() if isinstance(m, MaskedLayer)}
    state = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in masked and leaf in ("scores", "mask"):
            continue
        if module in masked and leaf == "weight":
            value = value * model.get_submodule(module).mask
        state[key] = value.detach().clone()
    return state


def main(argv=None) -> int:
    """``python -m bip.export RUN_DIR [--out FILE]``: a finished run -> dense-with-zeros weights."""
    import argparse
    import sys
    from pathlib import Path

    from bip import checkpoint, identity
    from bip.errors import BipError
    from bip.models import create_model

    p = argparse.ArgumentParser(prog="python -m bip.export", description=main.__doc__.split(":")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="default: RUN_DIR/dense.pt")
    args = p.parse_args(argv)
    try:
        ckpt = checkpoint.load(args.run_dir / identity.CHECKPOINT)
        meta = ckpt.get("meta") or {}
        if "num_classes" not in meta:
            raise BipError(f"{args.run_dir / identity.CHECKPOINT} is not a bip run checkpoint")
        model = create_model(meta["arch"], meta["num_classes"], meta["layer_type"],
                             **meta.get("model_options", {}))
        model.load_state_dict(ckpt["model"])
        out = args.out or args.run_dir / "dense.pt"
        checkpoint.save(out, dense_state_dict(model))
    except BipError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
