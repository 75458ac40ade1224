"""The modules a thinned model is made of, and its rebuild spec (no pickled modules).

A thinned model is the original architecture with some leaf modules replaced by smaller ones.
``spec`` lists each replacement as ``{"name": qualname, "kind": KIND, "args": {...}}`` with
plain ints/bools/lists only, so a thinned file is ``{"spec", "state", "meta"}`` and loads with
``torch.load(weights_only=True)``; ``apply_spec`` rebuilds the empty modules, then the state
dict fills them (strict).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FoldedConv2d(nn.Conv2d):
    """A conv that also adds the contribution of removed input channels that were constant.

    A pruned filter's channel downstream of BatchNorm (and ReLU) is a constant c, but a conv
    with zero padding sees c inside the image and 0 in the padding, so its contribution
    differs at the borders and no bias can hold it. By linearity it equals
    conv(ones(H, W), sum_i c_i * W[:, i]) with the same stride / padding / dilation: one
    input channel at batch 1, broadcast over the batch, exact at every position and for any
    input size. ``fold_kernel`` is that summed kernel, shape [out, 1, kh, kw].
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("fold_kernel", torch.zeros(self.out_channels, 1, *self.kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(1, 1, x.shape[-2], x.shape[-1], dtype=x.dtype, device=x.device)
        border = F.conv2d(ones, self.fold_kernel.to(x.dtype), None, self.stride, self.padding,
                          self.dilation)
        return super().forward(x) + border


class ChannelScatter(nn.Module):
    """The thinned form of an option-A shortcut (bip.models.resnet_s.ZeroPadShortcut):
    spatial ::2 subsampling, then input channel ``src[i]`` goes to output channel ``dst[i]``
    and every other output channel is zero. The untouched case is a contiguous zero pad."""

    def __init__(self, src: list[int], dst: list[int], out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.register_buffer("src", torch.tensor(src, dtype=torch.long))
        self.register_buffer("dst", torch.tensor(dst, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        out = x.new_zeros(x.shape[0], self.out_channels, x.shape[2], x.shape[3])
        return out.index_copy(1, self.dst, x.index_select(1, self.src))


def conv_args(conv: nn.Conv2d, in_channels: int, out_channels: int, bias: bool) -> dict:
    return {"in_channels": in_channels, "out_channels": out_channels,
            "kernel_size": list(conv.kernel_size), "stride": list(conv.stride),
            "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding),
            "dilation": list(conv.dilation), "bias": bias, "padding_mode": conv.padding_mode}


def _conv(cls):
    def make(a: dict) -> nn.Module:
        padding = a["padding"] if isinstance(a["padding"], str) else tuple(a["padding"])
        return cls(a["in_channels"], a["out_channels"], tuple(a["kernel_size"]), tuple(a["stride"]),
                   padding, tuple(a["dilation"]), bias=a["bias"], padding_mode=a["padding_mode"])
    return make


def _batchnorm(a: dict) -> nn.Module:
    cls = nn.BatchNorm2d if a["dims"] == 2 else nn.BatchNorm1d
    return cls(a["num_features"], eps=a["eps"], momentum=a["momentum"], affine=a["affine"],
               track_running_stats=a["track_running_stats"])


def _scatter(a: dict) -> nn.Module:
    return ChannelScatter([0] * a["n"], [0] * a["n"], a["out_channels"])


# kind -> builder of an empty module from its args (weights come from the state dict).
BUILDERS = {
    "conv2d": _conv(nn.Conv2d),
    "folded_conv2d": _conv(FoldedConv2d),
    "linear": lambda a: nn.Linear(a["in_features"], a["out_features"], bias=a["bias"]),
    "batchnorm": _batchnorm,
    "channel_scatter": _scatter,
}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_spec(model: nn.Module, spec: list[dict]) -> nn.Module:
    """Replace the modules ``spec`` names by empty modules of the thinned shapes (in place)."""
    for entry in spec:
        if entry["kind"] not in BUILDERS:
            raise ValueError(f"unknown module kind {entry['kind']!r} in a thinned model spec")
        set_module(model, entry["name"], BUILDERS[entry["kind"]](entry["args"]))
    return model
