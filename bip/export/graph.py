"""Channel dependency analysis for bip.export.thin: which channel positions of a traced model are
coupled (one class = one coupled channel group), which are pinned, which are constant.

Every channel position of every traced tensor is a *slot*; ops that keep channels aligned
(BatchNorm, activations, pooling, elementwise adds, flatten, spatial slicing) unify their input
and output slots in a union-find, so a class is a coupled group: e.g. one residual-stream
channel across a whole stage, shortcuts included. Producers are conv/linear output filters
(dead when all their weights are zero); consumers are conv/linear input channels. A slot is
*constant* when it is input-independent and spatially uniform (all producers dead, through
channel-aligned ops that keep uniformity). Anything not understood pins its slots.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from bip.models.resnet_s import ZeroPadShortcut
from bip.export.modules import ChannelScatter

_BN = nn.modules.batchnorm._BatchNorm
# Channel-aligned leaf modules and functions: output channel i is input channel i, and a
# spatially uniform constant input stays one (AvgPool2d with padding is the exception, below).
_ALIGNED_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
                    nn.Sigmoid, nn.Tanh, nn.ELU, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Upsample,
                    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ALIGNED_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish,
                      F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.tanh, F.elu, F.dropout,
                      F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate}
_ALIGNED_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "float"}
_BINARY = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, operator.truediv,
           torch.add, torch.sub, torch.mul, torch.div, "add", "add_", "sub", "mul", "mul_", "div"}
_REDUCE_METHODS = {"mean", "sum", "amax", torch.mean, torch.sum, torch.amax}
_FLATTEN = {torch.flatten, "flatten", "view", "reshape"}


class Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.Linear, _BN)) or type(m) in RULES \
            or super().is_leaf_module(m, qualname)


@dataclass
class Graph:
    parent: list = field(default_factory=list)      # union-find over slot ids
    slots: dict = field(default_factory=dict)       # node -> [slot id] along dim 1
    const: dict = field(default_factory=dict)       # node -> [bool]: input-independent, uniform
    block: dict = field(default_factory=dict)       # node -> features per channel (after flatten)
    pinned: set = field(default_factory=set)
    consumers: list = field(default_factory=list)   # (conv / linear node, its input node)

    def new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: list[int], b: list[int]) -> None:
        for x, y in zip(a, b):
            self.parent[self.find(x)] = self.find(y)

    def pin(self, node) -> None:
        self.pinned.update(self.slots.get(node, ()))


def _channels(value) -> int | None:
    return value.shape[1] if isinstance(value, torch.Tensor) and value.dim() >= 2 else None


def analyze(gm: fx.GraphModule, env: dict) -> Graph:
    g = Graph()
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        value = env.get(node)
        ins = [a for a in node.all_input_nodes if a in g.slots]
        if node.op == "output":
            for a in ins:
                g.pin(a)
            continue
        handled = _step(g, node, modules.get(node.target) if node.op == "call_module" else None,
                        ins, value, env)
        if not handled:  # unknown op: keep every channel it touches
            for a in ins:
                g.pin(a)
            if _channels(value) is not None:
                g.slots[node] = g.new(_channels(value))
                g.const[node] = [False] * len(g.slots[node])
                g.block[node] = 1
                g.pin(node)
    return g


def _inherit(g: Graph, node, src, const: bool = True, block: int | None = None) -> bool:
    g.slots[node] = g.slots[src]
    g.const[node] = g.const[src] if const else [False] * len(g.slots[src])
    g.block[node] = g.block[src] if block is None else block
    return True


def _step(g: Graph, node, module, ins, value, env) -> bool:
    """Record one node; False if it is not understood (the caller pins its channels)."""
    if node.op == "placeholder":
        if _channels(value) is not None:
            n = _channels(value)
            g.slots[node], g.const[node], g.block[node] = g.new(n), [False] * n, 1
            g.pin(node)
        return True
    if node.op in ("get_attr",) or (not ins and _channels(value) is None):
        return not ins  # constants / shape arithmetic: nothing to track
    if any(a not in g.slots and isinstance(env.get(a), torch.Tensor) and env[a].numel() > 1
           for a in node.all_input_nodes):
        return False  # mixes in an untracked tensor (a parameter read by get_attr, ...)
    target = module if module is not None else node.target
    x = ins[0] if ins else None
    if type(module) in (nn.Conv2d, nn.Linear):  # subclasses may compute more (FoldedConv2d): unknown
        if len(ins) != 1 or (isinstance(module, nn.Conv2d) and module.groups != 1) \
                or (isinstance(module, nn.Linear) and env[x].dim() != 2):
            return False
        w = module.weight.detach()
        g.consumers.append((node, x))
        g.slots[node] = g.new(w.shape[0])
        g.block[node] = 1
        g.const[node] = (w.flatten(1) == 0).all(1).tolist()  # a dead filter outputs its bias
        return True
    if isinstance(module, _BN) or isinstance(module, _ALIGNED_MODULES):
        padded = isinstance(module, nn.AvgPool2d) and module.padding not in (0, (0, 0))
        return len(ins) == 1 and _inherit(g, node, x, const=not padded)
    if type(module) in RULES:
        return len(ins) == 1 and RULES[type(module)].analyze(g, node, module, x)
    if isinstance(module, nn.Flatten) or target in _FLATTEN:
        return len(ins) == 1 and _flatten(g, node, x, env[x], value)
    if target in ("size", "dim") and _channels(value) is None:
        return True  # shape queries: read at run time, so a thinner tensor answers for itself
    if target is F.avg_pool2d:  # zero padding makes a constant input non-uniform at the borders
        padding = node.kwargs.get("padding", node.args[3] if len(node.args) > 3 else 0)
        return len(ins) == 1 and _inherit(g, node, x, const=padding in (0, (0, 0)))
    if target in _ALIGNED_FUNCTIONS or target in _ALIGNED_METHODS:
        return len(ins) == 1 and _channels(value) == _channels(env[x]) and _inherit(g, node, x)
    if target in _BINARY:
        return _binary(g, node, ins, env, value)
    if target in _REDUCE_METHODS:
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dims = [dims] if isinstance(dims, int) else dims
        rank = env[x].dim()
        return dims is not None and len(ins) == 1 and 1 not in [d % rank for d in dims] \
            and _inherit(g, node, x)
    if target is torch.cat:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if dim != 1 or any(g.block[a] != 1 for a in ins) or len(ins) != len(node.args[0]):
            return False
        g.slots[node] = [s for a in node.args[0] for s in g.slots[a]]
        g.const[node] = [c for a in node.args[0] for c in g.const[a]]
        g.block[node] = 1
        return True
    if target is operator.getitem and len(ins) == 1:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        spatial_only = len(index) <= env[x].dim() and all(isinstance(i, slice) for i in index) \
            and all(i == slice(None) for i in index[:2])
        return spatial_only and _inherit(g, node, x)
    if target is F.pad and len(ins) == 1:
        pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
        return len(pad) <= 2 * (env[x].dim() - 2) and _inherit(g, node, x, const=not any(pad))
    return False


def _flatten(g: Graph, node, x, before: torch.Tensor, after) -> bool:
    """[N, C, H, W] -> [N, C*H*W]: channel c becomes a block of H*W features."""
    if not isinstance(after, torch.Tensor) or after.dim() != 2 or after.shape[0] != before.shape[0]:
        return False
    per_channel = before[0, 0].numel() if before.dim() > 2 else 1
    return after.shape[1] == before.shape[1] * per_channel and \
        _inherit(g, node, x, block=g.block[x] * per_channel)


def _binary(g: Graph, node, ins, env, value) -> bool:
    """Elementwise with broadcasting: same-width operands are coupled slot by slot; an operand
    without channels (scalar, [N, 1, H, W]) does not couple."""
    wide = [a for a in ins if _channels(env[a]) == _channels(value) and env[a].dim() == value.dim()]
    if not wide or _channels(value) is None:
        return False
    narrow = [a for a in ins if a not in wide]
    if any(_channels(env[a]) != 1 for a in narrow) or len({g.block[a] for a in wide}) != 1:
        return False
    for a in narrow:  # a broadcast [N, 1, ...] operand: its one channel must stay
        g.pin(a)
    for a in wide[1:]:
        g.union(g.slots[a], g.slots[wide[0]])
    g.slots[node] = g.slots[wide[0]]
    g.const[node] = [all(g.const[a][i] for a in wide) and all(all(g.const[a]) for a in narrow)
                     for i in range(len(g.slots[node]))]
    g.block[node] = g.block[wide[0]]
    return True


class _ZeroPadRule:
    """ZeroPadShortcut: output channel j carries input channel j - half (option A), the other
    output channels are constant zero (dead producers of their own)."""

    @staticmethod
    def analyze(g: Graph, node, module: ZeroPadShortcut, x) -> bool:
        half = module.extra_channels // 2
        inputs = g.slots[x]
        pads = g.new(module.extra_channels)
        g.slots[node] = pads[:half] + inputs + pads[half:]
        g.const[node] = [True] * half + g.const[x] + [True] * (module.extra_channels - half)
        g.block[node] = 1
        return True

    @staticmethod
    def thin(module: ZeroPadShortcut, in_keep: list[int], out_keep: list[int]):
        half = module.extra_channels // 2
        position = {c: i for i, c in enumerate(in_keep)}
        pairs = [(position[j - half], q) for q, j in enumerate(out_keep) if j - half in position]
        src, dst = [p[0] for p in pairs], [p[1] for p in pairs]
        new = ChannelScatter(src, dst, len(out_keep))
        return new, {"kind": "channel_scatter", "args": {"n": len(src), "out_channels": len(out_keep)}}


# Leaf modules with their own channel mapping: type -> rule (analyze, thin).
RULES: dict[type, object] = {ZeroPadShortcut: _ZeroPadRule}
