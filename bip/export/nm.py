"""Export side of N:M (e.g. 2:4) semi-structured masks.

Pattern (the layout of NVIDIA's ASP and sparse tensor cores): in every masked layer, each group
of M consecutive weights along the input dimension keeps exactly N; a conv weight is viewed as
[out, kh, kw, in]. On a CUDA GPU with sparse tensor cores (compute capability >= 8.0) the
Linear layers whose masks follow the pattern and whose shapes the kernels accept become
``torch.sparse.to_sparse_semi_structured`` weights (bfloat16). PyTorch has no semi-structured
convolution, so convs stay dense-with-zeros everywhere; on CPU everything does (and says so).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bip.pruning.layers import MaskedLayer


def nm_groups(mask: torch.Tensor, m: int) -> torch.Tensor | None:
    """The mask as [groups, m] along the input dimension ([out, kh, kw, in] for convs), or None
    when the input dimension is not a multiple of m."""
    view = mask.permute(0, 2, 3, 1) if mask.dim() == 4 else mask
    if view.shape[-1] % m:
        return None
    return view.reshape(-1, m)


def check_pattern(model: nn.Module, n: int, m: int) -> dict:
    """{"nm": [layers with exactly n of every m kept], "not_multiple": [...], "other": [...]}."""
    out = {"nm": [], "not_multiple": [], "other": []}
    for name, layer in model.named_modules():
        if not isinstance(layer, MaskedLayer):
            continue
        groups = nm_groups(layer.mask, m)
        if groups is None:
            out["not_multiple"].append(name)
        elif bool((groups.sum(1) == n).all()):
            out["nm"].append(name)
        else:
            out["other"].append(name)
    return out


def sparse_kernels_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


@torch.no_grad()
def to_semi_structured(model: nn.Module, layers: list[str],
                       device: torch.device) -> tuple[nn.Module, list[str]]:
    """Dense copy of ``model`` in bfloat16 on ``device`` whose listed Linear layers hold
    semi-structured sparse weights; returns it and the names converted (shapes the kernels
    reject stay dense)."""
    from torch.sparse import to_sparse_semi_structured

    from bip.export.thin import dense_copy
    dense = dense_copy(model).eval().to(device=device, dtype=torch.bfloat16)
    converted = []
    for name in layers:
        layer = dense.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            continue
        try:
            layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight), requires_grad=False)
        except (RuntimeError, ValueError):  # shape / dtype constraints of the sparse kernels
            continue
        converted.append(name)
    return dense, converted


def nm_of(meta: dict) -> tuple[int, int]:
    """(N, M) of a run: its meta's ``n`` and ``m`` (prune.n / prune.m), 2:4 by default."""
    return int(meta.get("n", 2)), int(meta.get("m", 4))


def nm_export(model: nn.Module, meta: dict, device: str, log) -> dict:
    """Check the N:M pattern of a run's masks; convert where the hardware allows. Returns the
    ``nm`` block of export.json."""
    from bip.errors import BipError
    n, m = nm_of(meta)
    found = check_pattern(model, n, m)
    if not found["nm"]:
        raise BipError(f"--nm-sparse: no masked layer keeps exactly {n} of every {m} weights")
    dev = torch.device(device)
    if sparse_kernels_available(dev):
        _, converted = to_semi_structured(model, found["nm"], dev)
        fmt = "semi-structured (torch.sparse, bf16) for the converted Linear layers"
    else:
        converted = []
        fmt = "dense-with-zeros"
        log(f"--nm-sparse: {n}:{m} pattern verified in {len(found['nm'])} layers; semi-structured "
            "sparse kernels need a CUDA GPU with compute capability >= 8.0, so the export is "
            "dense-with-zeros (dense.pt)")
    return {"n": n, "m": m, "layers_nm": found["nm"], "layers_not_multiple": found["not_multiple"],
            "layers_other": found["other"], "converted": converted, "format": fmt,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
