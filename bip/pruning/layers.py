"""Masked conv/linear layers and the layer factory that models are built from.

A masked layer owns a weight-shaped score tensor ``scores`` (S) and a weight-shaped bool buffer
``mask`` (M). Its forward uses Z = W * M. The mask is NOT recomputed here: bip.pruning.masking sets it
once per optimizer step (and for eval), so every forward of a step sees the same mask.

Straight-through gradient (HYDRA/BiP): dL/dS = sign(S) * W * dL/dZ at every position, pruned
ones included, so a pruned weight can re-enter the top-k. With ``ig_coeff`` = c > 0 the same
backward gives BiP's upper-level gradient sign(S) * (W * g - c * M * g^2), g = dL/dZ, at no
extra pass. Under DDP BiP needs g averaged over ranks BEFORE it is squared: with a ``g_sink``
(bip.methods.gsync.GReducer) the backward hands g to it and leaves the score gradient to it.

A layer with ``prunable = False`` (prune.skip) or an nm layer whose input size is not a
multiple of M is left dense (``is_pruned`` is False): its mask stays all ones and its scores
never train.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

GRANULARITIES = ("unstructured", "filter", "channel", "nm")


def score_grad(weight, scores, mask, g, ig_coeff: float) -> torch.Tensor:
    """dL/dS = sign(S) * (W - c * M * g) * g (c = 0: HYDRA's straight-through estimator)."""
    direction = weight if ig_coeff == 0 else weight - ig_coeff * mask * g
    return torch.sign(scores) * direction * g


class _MaskedWeight(torch.autograd.Function):
    """Z = W * M, with the straight-through (and optional implicit-gradient) score gradient."""

    @staticmethod
    def forward(ctx, weight, scores, mask, ig_coeff: float, sink):
        ctx.save_for_backward(weight, scores, mask)
        ctx.ig_coeff, ctx.sink = ig_coeff, sink
        return weight * mask

    @staticmethod
    def backward(ctx, grad_z):
        weight, scores, mask = ctx.saved_tensors
        grad_w = grad_z * mask if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            if ctx.sink is not None:  # the sink forms the score gradient from the averaged g
                ctx.sink(grad_z)
            else:
                grad_s = score_grad(weight, scores, mask, grad_z, ctx.ig_coeff)
        return grad_w, grad_s, None, None, None


class MaskedLayer:
    """Mixin for the score/mask state shared by MaskedConv2d and MaskedLinear.

    ``grad_target`` says which tensors this forward differentiates: "all" (default, by
    requires_grad), "weights" (scores treated as constants) or "scores" (weights treated as
    constants; ``ig_coeff`` adds BiP's implicit-gradient term). BiP switches it per pass
    (bip.pruning.masking.grad_target) instead of toggling requires_grad, which DDP does not allow.
    """

    granularity: str

    def _init_masking(self, granularity: str) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.granularity = granularity
        self.scores = nn.Parameter(torch.empty_like(self.weight))
        # Like a default conv/linear weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.grad_target = "all"
        self.ig_coeff = 0.0
        self.g_sink = None
        self.prunable = True  # False: left dense by prune.skip (bip.pruning.masking.configure)
        self.nm = (2, 4)      # (N, M) of an nm layer (bip.pruning.masking.configure)

    @property
    def is_pruned(self) -> bool:
        """False for a layer left dense: skipped, or nm with an input size not a multiple of M."""
        return self.prunable and not (self.granularity == "nm" and self.weight.shape[1] % self.nm[1])

    def masked_weight(self) -> torch.Tensor:
        weight, scores = self.weight, self.scores
        if self.grad_target == "scores":
            weight = weight.detach()
        differentiate_scores = scores.requires_grad and self.grad_target != "weights"
        if not (differentiate_scores and self.is_pruned):
            return weight * self.mask
        sink = None if self.g_sink is None else functools.partial(self.g_sink.add, self)
        return _MaskedWeight.apply(weight, scores, self.mask, self.ig_coeff, sink)


    @classmethod
    def from_dense(cls, dense: nn.Module, granularity: str):
        """A masked layer that adopts ``dense``'s weight and bias Parameters (no copy: a state
        dict of the dense layer loads into it unchanged), with fresh scores and an all-ones mask.
        Built on the meta device first, so the weight is never allocated twice."""
        layer = cls._like(dense)
        layer.weight, layer.bias = dense.weight, dense.bias
        layer.train(dense.training)
        layer._init_masking(granularity)
        return layer


class MaskedConv2d(nn.Conv2d, MaskedLayer):
    def __init__(self, *args, granularity: str = "unstructured", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_masking(granularity)

    @classmethod
    def _like(cls, c: nn.Conv2d) -> "MaskedConv2d":
        return cls(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                   c.groups, c.bias is not None, c.padding_mode, device="meta", dtype=c.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class MaskedLinear(nn.Linear, MaskedLayer):
    """filter = output rows, channel = input columns of the weight (tv:/timm: models; the
    built-in models keep their linear layers dense in those modes, see LayerFactory)."""

    def __init__(self, *args, granularity: str = "unstructured", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_masking(granularity)

    @classmethod
    def _like(cls, lin: nn.Linear) -> "MaskedLinear":
        return cls(lin.in_features, lin.out_features, lin.bias is not None, device="meta",
                   dtype=lin.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


@dataclass(frozen=True)
class LayerFactory:
    """Builds the conv/linear layers of a model for one ``layer_type``.

    dense: plain nn.Conv2d / nn.Linear. unstructured, nm: every conv and linear is masked.
    filter / channel: every conv is masked at that granularity; linear layers stay dense
    (as in the reference code).
    """

    layer_type: str = "dense"

    def __post_init__(self):
        if self.layer_type not in ("dense",) + GRANULARITIES:
            raise ValueError(f"unknown layer_type {self.layer_type!r}")

    def conv(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
             padding: int = 0, bias: bool = False) -> nn.Conv2d:
        if self.layer_type == "dense":
            return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        return MaskedConv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias,
                            granularity=self.layer_type)

    def linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
        if self.layer_type in ("unstructured", "nm"):
            return MaskedLinear(in_features, out_features, bias=bias, granularity=self.layer_type)
        return nn.Linear(in_features, out_features, bias=bias)
