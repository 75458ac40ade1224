"""Physically thinned structured models: pruned filters and input channels removed, with every
coupled layer adjusted, computing the same function as the masked model (eval mode).

How (torch.fx and our own dependency grouping; README "Thinned export" says why not Torch-Pruning):
1. ``dense_copy``: masked layers become plain conv/linear layers holding W * M (exact zeros).
2. The model is traced with torch.fx and run once on an example input; bip.export.graph groups
   coupled channels (union-find over channel slots) and marks pinned and constant ones.
3. A group is removed when nothing pins it (graph input/output, an op the analysis does not
   know) and every consumer that still reads it (nonzero weights in a kept filter) sees a
   *constant* there: a channel whose producers are all dead filters is input-independent and
   spatially uniform (through BatchNorm, ReLU, adds of constants, pooling, subsampling). Its
   value, read from the trace, is folded into the consumer: into the bias (linear layers, convs
   without zero padding), or for a zero-padded conv into FoldedConv2d's border-exact kernel
   (bip.export.modules). A group no consumer reads is removed whatever its producers hold (the
   channel-pruning case). Removing filters can leave more inputs unread: step 3 iterates to a
   fixed point.
4. Surgery: each leaf is replaced by a smaller one (sliced weights, BN statistics, folded
   biases); the replacement list is the rebuild spec (bip.export.modules.apply_spec).

What coupling keeps (a channel one residual-stream layer pruned and another kept) stays as zero
weights; ``thin`` reports those MACs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from bip.errors import BipError
from bip.pruning.layers import MaskedLayer
from bip.export.graph import _BN, RULES, Graph, Tracer, analyze
from bip.export.modules import FoldedConv2d, conv_args, set_module


def dense_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every masked layer is a plain Conv2d / Linear holding W * M
    (pruned weights exactly zero); scores and masks are gone. Works on any module tree."""
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if not isinstance(m, MaskedLayer):
            continue
        if isinstance(m, nn.Conv2d):
            plain = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                              m.dilation, m.groups, m.bias is not None, m.padding_mode)
        else:
            plain = nn.Linear(m.in_features, m.out_features, m.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(m.weight * m.mask)
            if m.bias is not None:
                plain.bias.copy_(m.bias)
        set_module(out, name, plain.to(m.weight.device, m.weight.dtype).train(m.training))
    return out


# -- decisions and surgery -------------------------------------------------------------------

@dataclass
class _Consumer:
    node: fx.Node
    x: fx.Node
    nonzero: torch.Tensor  # bool [out, in slots]: weight block of (filter, input channel) != 0


def _consumers(g: Graph, modules: dict) -> list[_Consumer]:
    out = []
    for node, x in g.consumers:
        w = modules[node.target].weight.detach()
        out.append(_Consumer(node, x, (w != 0).reshape(w.shape[0], len(g.slots[x]), -1).any(2)))
    return out


def _decide(g: Graph, consumers: list[_Consumer], keep: set[int] = frozenset()) -> set[int]:
    """Root slots of the removed classes (module docstring, step 3), iterated to a fixed point;
    the roots in ``keep`` stay."""
    roots = {g.find(s) for s in range(len(g.parent))}
    pinned = {g.find(s) for s in g.pinned} | set(keep)
    removed: set[int] = set()
    while True:
        needed = set(pinned)
        for c in consumers:
            kept_filters = [j for j, s in enumerate(g.slots[c.node]) if g.find(s) not in removed]
            reads = c.nonzero[kept_filters].any(0).tolist()
            needed.update(g.find(s) for s, read, const in zip(g.slots[c.x], reads, g.const[c.x])
                          if read and not const)
        now = roots - needed
        if now == removed:
            return removed
        removed = now


def _aligned(g: Graph, consumers: list[_Consumer], align: int) -> set[int]:
    """Removed classes, with some kept back so that every conv / linear output width is a
    multiple of ``align`` (or all of it): odd widths such as 114 run slower per MAC in oneDNN
    and cuDNN kernels than 112 or 120. Keeping a class back is always exact (it computes what
    the masked model computes); the first removed classes of a short layer are kept."""
    keep: set[int] = set()
    while True:
        removed = _decide(g, consumers, keep)
        more = set()
        for c in consumers:
            roots = [g.find(s) for s in g.slots[c.node]]
            gone = [r for r in dict.fromkeys(roots) if r in removed]
            short = (-sum(r not in removed for r in roots)) % align
            more.update(gone[:min(short, len(gone))])
        if not more:
            return removed
        keep |= more


def _keep(g: Graph, removed: set[int], node) -> list[int]:
    return [i for i, s in enumerate(g.slots[node]) if g.find(s) not in removed]


def _constant(value: torch.Tensor, i: int, block: int) -> float:
    """The value of a removed constant channel (uniform by construction; pooling may differ by
    rounding, so the mean is taken and the spread checked)."""
    part = value[0, i] if block == 1 else value[0, i * block:(i + 1) * block]
    part = part.double()
    spread = float(part.max() - part.min())
    assert spread <= 1e-5 * (1 + float(part.abs().max())), f"channel {i} is not constant ({spread})"
    return float(part.mean())


def _thin_layer(g, removed, c: _Consumer, module, env) -> tuple[nn.Module, dict] | None:
    in_keep, out_keep = _keep(g, removed, c.x), _keep(g, removed, c.node)
    block = g.block[c.x]
    w = module.weight.detach()[out_keep].double()
    w_in = w.reshape(len(out_keep), len(g.slots[c.x]), block, *w.shape[2:])
    folded = torch.zeros_like(w_in[:, 0])  # sum_i c_i * W[:, i] over removed channels read
    for i in sorted(set(range(len(g.slots[c.x]))) - set(in_keep)):
        if c.nonzero[out_keep, i].any():
            folded += _constant(env[c.x], i, block) * w_in[:, i]
    if len(in_keep) == len(g.slots[c.x]) and len(out_keep) == module.weight.shape[0] and not folded.any():
        return None
    weight = w_in[:, in_keep].reshape(len(out_keep), len(in_keep) * block, *w.shape[2:])
    bias = module.bias.detach()[out_keep].double() if module.bias is not None else None
    border = isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and \
        (module.padding == "same" or any(p > 0 for p in module.padding if isinstance(p, int)))
    if folded.any() and not border:  # the constant is the same at every output position
        extra = folded.flatten(1).sum(1)
        bias = extra if bias is None else bias + extra
    if isinstance(module, nn.Conv2d):
        args = conv_args(module, weight.shape[1], weight.shape[0], bias is not None)
        kind = "folded_conv2d" if border and folded.any() else "conv2d"
        new = (FoldedConv2d if kind == "folded_conv2d" else nn.Conv2d)(
            weight.shape[1], weight.shape[0], module.kernel_size, module.stride, module.padding,
            module.dilation, bias=bias is not None, padding_mode=module.padding_mode)
        if kind == "folded_conv2d":
            new.fold_kernel.copy_(folded)  # [out, block = 1, kh, kw]
    else:
        kind, args = "linear", {"in_features": weight.shape[1], "out_features": weight.shape[0],
                                "bias": bias is not None}
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new.to(module.weight.device, module.weight.dtype), {"kind": kind, "args": args}


def _thin_bn(bn: _BN, keep: list[int]) -> tuple[nn.Module, dict]:
    args = {"num_features": len(keep), "eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine,
            "track_running_stats": bn.track_running_stats, "dims": 2 if isinstance(bn, nn.BatchNorm2d) else 1}
    new = (nn.BatchNorm2d if args["dims"] == 2 else nn.BatchNorm1d)(
        len(keep), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    index = torch.tensor(keep, dtype=torch.long, device=(bn.running_mean if bn.running_mean is not None
                                                         else bn.weight).device)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(bn, name) is not None:
                getattr(new, name).copy_(getattr(bn, name).index_select(0, index))
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    ref = bn.weight if bn.weight is not None else bn.running_mean
    return new.to(ref.device, ref.dtype).eval(), {"kind": "batchnorm", "args": args}


def _trace(dense: nn.Module, example: torch.Tensor) -> tuple[fx.GraphModule, dict, Graph]:
    try:
        gm = fx.GraphModule(dense, Tracer().trace(dense))
    except Exception as err:  # noqa: BLE001 - fx raises many kinds (TraceError, TypeError, ...)
        raise BipError(f"cannot thin {type(dense).__name__}: torch.fx cannot trace it "
                       f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    interpreter = fx.Interpreter(gm, garbage_collect_values=False)
    interpreter.run(example[:1])
    return gm, interpreter.env, analyze(gm, interpreter.env)


@torch.no_grad()
def channel_groups(model: nn.Module, example: torch.Tensor) -> dict[str, list[int]]:
    """{conv / linear name: coupled-group id of each output filter}. Filters sharing an id leave
    the model only together (what group-consistent masks need); -1 marks pinned filters, which
    always stay (model outputs, unknown ops)."""
    dense = dense_copy(model).eval()
    _, _, g = _trace(dense, example)
    pinned = {g.find(s) for s in g.pinned}
    return {node.target: [-1 if g.find(s) in pinned else g.find(s) for s in g.slots[node]]
            for node, _ in g.consumers}


@torch.no_grad()
def thin(model: nn.Module, example: torch.Tensor, align: int = 1) -> tuple[nn.Module, list[dict], dict]:
    """(thinned model, rebuild spec, report) for ``model`` (masked or with exact zeros), which
    must compute in eval mode what the thinned model computes. ``example``: one input batch
    (its shape fixes the traced resolution; the thinned model accepts any resolution the
    original does). The report counts channels and the MACs that coupling kept as zeros."""
    dense = dense_copy(model).eval()
    gm, env, g = _trace(dense, example)
    calls: dict[str, list] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    for name, nodes in calls.items():
        module = dense.get_submodule(name)
        stateful = isinstance(module, (nn.Conv2d, nn.Linear, _BN)) or type(module) in RULES
        if len(nodes) > 1 and stateful:  # a shared layer has one shape: keep its channels
            for node in nodes:
                g.pin(node)
                for a in node.all_input_nodes:
                    g.pin(a)
    modules = dict(dense.named_modules())
    consumers = _consumers(g, modules)
    removed = _aligned(g, consumers, align) if align > 1 else _decide(g, consumers)
    thinned, spec = copy.deepcopy(dense), []
    by_node = {c.node: c for c in consumers}
    for name, nodes in calls.items():
        node, module = nodes[0], modules[name]
        if node not in g.slots:
            continue
        if node in by_node:
            made = _thin_layer(g, removed, by_node[node], module, env)
        elif isinstance(module, _BN):
            keep = _keep(g, removed, node)
            made = _thin_bn(module, keep) if len(keep) < len(g.slots[node]) else None
        elif type(module) in RULES:
            x = node.all_input_nodes[0]
            made = RULES[type(module)].thin(module, _keep(g, removed, x), _keep(g, removed, node))
        else:
            made = None
        if made is not None:
            set_module(thinned, name, made[0])
            spec.append({"name": name, **made[1]})
    return thinned.eval(), spec, _report(g, removed, calls, modules, dict(thinned.named_modules()), env)


def _report(g, removed, calls, before: dict, after: dict, env) -> dict:
    channels, coupling, fold = {}, 0, 0
    for name, nodes in calls.items():
        old, new = before[name], after[name]
        if not isinstance(old, (nn.Conv2d, nn.Linear)):
            continue
        positions = env[nodes[0]][0, 0].numel() if isinstance(old, nn.Conv2d) else 1
        w = new.weight
        channels[name] = [w.shape[1] * (old.groups if isinstance(old, nn.Conv2d) else 1),
                          w.shape[0]]
        coupling += int(w.numel() - w.count_nonzero()) * positions
        if isinstance(new, FoldedConv2d):
            fold += new.fold_kernel.numel() * positions
    groups = {g.find(s) for s in range(len(g.parent))}
    return {"channel_groups": len(groups), "channel_groups_removed": len(removed),
            "macs_zero_kept": coupling, "macs_fold_per_forward": fold, "channels": channels}
