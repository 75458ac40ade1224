"""Make any model maskable: swap its conv / linear layers for masked ones, and prove coverage.

``swap_layers(model, layer_type, skip, input_size)`` replaces, in place,
- every ``nn.Conv2d`` and ``nn.Linear`` whose forward is the stock one (subclasses that only
  add attributes, like MultiheadAttention's out_proj type, count) by MaskedConv2d /
  MaskedLinear, adopting the same weight and bias Parameters (state dict keys do not change);
- every ``nn.MultiheadAttention`` with a packed q/k/v projection (torchvision's ViT) by
  MaskedMultiheadAttention, whose in- and out-projections are MaskedLinear layers. The stock
  module would hand its raw ``in_proj_weight`` and ``out_proj.weight`` to its kernel, so
  swapping only the out_proj child would be silently unmasked.

What is left dense on purpose (the ``skip`` options, model.skip_* in the config):
``first_conv`` (the first conv the forward runs), ``classifier`` (the logits layer: timm's
pretrained_cfg names it; otherwise the last conv/linear the forward runs), ``depthwise``
(groups == in_channels > 1), ``patch_embed`` (non-overlapping "patchify" convs: kernel ==
stride > 1, the stems of ViT / Swin / ConvNeXt and ConvNeXt's downsampling layers). Always,
by rule: grouped convs (groups > 1) under ``channel``: a column of a grouped weight is a
different input channel in every group, so "prune input channel c" is not a column mask there.
(Under ``filter`` and ``unstructured`` grouped and depthwise convs are masked: an output filter
belongs to exactly one group.)

Coverage: after the swap, a parameter is UNCOVERED (and the build fails, listing them) if
(a) it is a weight of a conv / linear / attention / RNN module that was neither swapped nor
    skipped (Conv1d/3d, transposed convs, conv subclasses with their own forward such as
    timm's Conv2dSame or StdConv2d, MultiheadAttention with separate q/k/v weights, LSTMs), or
(b) one forward (eval mode, on meta tensors: no compute, nothing allocated) hands it, or a
    view of it, directly to a weight op (linear, conv, matmul/einsum family, attention or RNN
    kernels) instead of through a masked layer: a parent reading a child's raw ``weight``, a
    custom ``x @ self.W``.
Not masked by design, and fine: biases and every other 1-D parameter (norm affine, layer
scale), normalisation layers, nn.Embedding tables, and >= 2-D parameters used only
elementwise or as lookups (position embeddings, class tokens, relative-position tables).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from bip.errors import BipError
from bip.pruning.layers import MaskedConv2d, MaskedLayer, MaskedLinear

SKIPS = ("first_conv", "classifier", "depthwise", "patch_embed")
# Ops whose tensor operands act as weights: a parameter reaching one of them unmasked is uncovered.
WEIGHT_OPS = frozenset({
    "linear", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "convolution", "_convolution", "conv_tbc", "matmul", "__matmul__",
    "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm", "addmv", "mv", "einsum",
    "tensordot", "multi_head_attention_forward", "_native_multi_head_attention",
    "_transformer_encoder_layer_fwd", "lstm", "gru", "rnn_tanh", "rnn_relu"})
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.MultiheadAttention, nn.RNNBase)
# Subclasses with their own forward that computes exactly the stock layer's (outside
# TorchScript): swapped like the stock layers. timm uses this Linear for some classifiers.
_EQUIVALENT = frozenset({"timm.layers.linear.Linear"})


class MaskedMultiheadAttention(nn.Module):
    """nn.MultiheadAttention (packed q/k/v, the torchvision ViT case) computed from masked
    projections: ``in_proj`` (3E x E; filter = output rows, channel = input columns) and
    ``out_proj``. The forward is the stock slow path (F.multi_head_attention_forward with the
    same arguments), so with all-ones masks it returns bit-identical outputs. A torchvision
    state dict (``in_proj_weight`` / ``in_proj_bias``) loads into it unchanged."""

    # torch's fused TransformerEncoderLayer / MHA fast paths read in_proj_weight itself,
    # bypassing the mask; they are only taken when this flag is True.
    _qkv_same_embed_dim = False

    def __init__(self, mha: nn.MultiheadAttention, granularity: str):
        super().__init__()
        assert mha._qkv_same_embed_dim, "separate q/k/v projections are reported as uncovered"
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.dropout, self.batch_first, self.add_zero_attn = mha.dropout, mha.batch_first, mha.add_zero_attn
        self.register_parameter("bias_k", mha.bias_k)
        self.register_parameter("bias_v", mha.bias_v)
        packed = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=mha.in_proj_bias is not None,
                           device="meta", dtype=mha.in_proj_weight.dtype)
        packed.weight, packed.bias = mha.in_proj_weight, mha.in_proj_bias
        self.in_proj = MaskedLinear.from_dense(packed, granularity)
        self.out_proj = MaskedLinear.from_dense(mha.out_proj, granularity)
        self.train(mha.training)
        self._register_load_state_dict_pre_hook(_packed_keys)

    @property
    def in_proj_bias(self):  # read by torch's TransformerEncoderLayer before its fast-path checks
        return self.in_proj.bias

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched_first = self.batch_first and query.dim() == 3
        if batched_first:  # keep identities: the kernel takes the one-projection path for q is k is v
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj.masked_weight(),
            self.in_proj.bias, self.bias_k, self.bias_v, self.add_zero_attn, self.dropout,
            self.out_proj.masked_weight(), self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        return (out.transpose(1, 0) if batched_first else out), weights


def _packed_keys(state_dict, prefix, *_):
    for name in ("weight", "bias"):
        if prefix + f"in_proj_{name}" in state_dict:
            state_dict[prefix + f"in_proj.{name}"] = state_dict.pop(prefix + f"in_proj_{name}")


@dataclass
class SwapSummary:
    masked: list[str] = field(default_factory=list)          # module names, now masked
    skipped: dict[str, str] = field(default_factory=dict)    # module name -> why it stays dense


def _stock(m: nn.Module, base: type, *methods: str) -> bool:
    return isinstance(m, base) and (_qualname(m) in _EQUIVALENT or
                                    all(getattr(type(m), f) is getattr(base, f) for f in methods))


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def swap_layers(model: nn.Module, layer_type: str, skip=(), input_size: int = 224,
                classifier: tuple[str, ...] = (), first_conv: str = "") -> SwapSummary:
    """Swap in place (module docstring); raise BipError if any parameter is uncovered.
    ``classifier`` / ``first_conv`` name those layers when the model says (timm); otherwise
    they are found by running the forward once on meta tensors."""
    unknown = set(skip) - set(SKIPS)
    if unknown:
        raise BipError(f"unknown skip option(s) {sorted(unknown)}; valid: {', '.join(SKIPS)}")
    _check_tied(model)
    order = [n for n in forward_order(model, input_size) if isinstance(model.get_submodule(n), _WEIGHTED)]
    classifier = set(classifier) or set(order[-1:])
    convs = [n for n in order if isinstance(model.get_submodule(n), nn.Conv2d)]
    first_conv = first_conv or (convs[0] if convs else "")
    summary, done = SwapSummary(), {}

    def reason(name: str, m: nn.Module) -> str:
        conv = isinstance(m, nn.Conv2d)
        if "classifier" in skip and _under(name, classifier):
            return "classifier (model.skip_classifier)"
        if "first_conv" in skip and _under(name, {first_conv}):
            return "first conv (model.skip_first_conv)"
        if conv and "depthwise" in skip and m.groups == m.in_channels > 1:
            return "depthwise conv (model.skip_depthwise)"
        if conv and "patch_embed" in skip and m.kernel_size == m.stride and m.kernel_size != (1, 1):
            return "patch embedding (model.skip_patch_embed)"
        if conv and layer_type == "channel" and m.groups > 1:
            return "grouped conv: no channel masking (a column is a different channel per group)"
        return ""

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in list(module._modules.items()):  # named_children hides repeats
            if child is None:
                continue
            name = f"{prefix}{child_name}"
            if id(child) in done:  # a module shared by two parents is swapped once
                setattr(module, child_name, done[id(child)])
                continue
            new = None
            if _stock(child, nn.MultiheadAttention, "forward") and child._qkv_same_embed_dim:
                new = MaskedMultiheadAttention(child, layer_type)
            elif isinstance(child, nn.MultiheadAttention):
                continue  # separate q/k/v weights: reported as uncovered below
            elif _stock(child, nn.Conv2d, "forward", "_conv_forward") or _stock(child, nn.Linear, "forward"):
                why = reason(name, child)
                if why:
                    summary.skipped[name] = why
                else:
                    kind = MaskedConv2d if isinstance(child, nn.Conv2d) else MaskedLinear
                    new = kind.from_dense(child, layer_type)
            else:
                visit(child, name + ".")
                continue
            if new is not None:
                setattr(module, child_name, new)
                summary.masked.append(name)
            done[id(child)] = new if new is not None else child

    visit(model, "")
    uncovered = uncovered_parameters(model, set(summary.skipped), input_size)
    if uncovered:
        shown = ", ".join(f"{n} ({why})" for n, why in list(uncovered.items())[:8])
        more = f" and {len(uncovered) - 8} more" if len(uncovered) > 8 else ""
        raise BipError(f"the masked-layer swap cannot cover {len(uncovered)} parameter(s) this model "
                       f"uses as conv/linear weights: {shown}{more}; such models are not supported")
    return summary


def _under(name: str, roots: set[str]) -> bool:
    """``name`` is one of ``roots`` or inside one (a config may name a container)."""
    return any(r and (name == r or name.startswith(r + ".")) for r in roots)


def _check_tied(model: nn.Module) -> None:
    """A conv/linear weight that is also another module's parameter (an embedding tied to the
    output layer) would be masked, and zeroed, for both."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, m in model.named_modules():  # a module shared by two parents is one owner
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((f"{name}.{pname}", m))
    for names in owners.values():
        if len(names) > 1 and any(isinstance(m, _WEIGHTED) for _, m in names):
            raise BipError(f"tied weights ({' is '.join(n for n, _ in names)}): masking one layer "
                           "would change the other; such models are not supported")


def uncovered_parameters(model: nn.Module, skipped: set[str], input_size: int) -> dict[str, str]:
    """{parameter name: why} per the module docstring's rules (a) and (b)."""
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, _WEIGHTED) and not isinstance(m, MaskedLayer) and name not in skipped:
            for pname, p in m.named_parameters(recurse=False):
                if p.dim() >= 2:
                    out[f"{name}.{pname}"] = f"{_qualname(m)} is not swappable"
    allowed = {f"{name}.{p}" for name in skipped for p, _ in model.get_submodule(name).named_parameters()}
    for pname, op in _weight_uses(model, input_size).items():
        if pname not in allowed and pname not in out:
            out[pname] = f"used directly by {op}"
    return out


def _meta_clone(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are meta tensors (nothing allocated, the
    model untouched; shared modules and tensors stay shared). torch.func.functional_call is not
    used: it leaves a module shared by two parents holding meta tensors."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
            for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def _run_meta(model: nn.Module, input_size: int, prepare=None):
    """One eval-mode forward of a meta copy of ``model`` (shapes only: no compute, no state
    changed). ``prepare(copy)`` may register hooks on the copy and return a TorchFunctionMode to
    run it under; that mode is returned."""
    clone = _meta_clone(model).eval()
    mode = prepare(clone) if prepare else contextlib.nullcontext()
    try:
        with torch.no_grad(), mode:
            clone(torch.empty(1, 3, input_size, input_size, device="meta"))
    except Exception as err:  # noqa: BLE001 (any model code can fail here)
        raise BipError(f"cannot run the model's forward at input size {input_size} on meta "
                       f"tensors to map its layers ({type(err).__name__}: {str(err)[:200]}); "
                       "set model.input_size if the model needs another size") from None
    return mode


def forward_order(model: nn.Module, input_size: int) -> list[str]:
    """Module names in the order the forward first calls them."""
    order: list[str] = []

    def hooks(clone):
        for name, m in clone.named_modules():
            if name:
                m.register_forward_pre_hook(lambda _m, _a, n=name: order.append(n))
        return contextlib.nullcontext()
    _run_meta(model, input_size, hooks)
    return list(dict.fromkeys(order))


class _WeightUses(TorchFunctionMode):
    """Records which >= 2-D parameters (or views of them) reach a weight op directly."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.params = {id(p): n for n, p in model.named_parameters() if p.dim() >= 2}
        self.uses: dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = getattr(func, "__name__", "")
        if op in WEIGHT_OPS:
            for t in _tensors((args, kwargs)):
                for x in (t, t._base):
                    if x is not None and id(x) in self.params:
                        self.uses.setdefault(self.params[id(x)], op)
        return func(*args, **kwargs)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _weight_uses(model: nn.Module, input_size: int) -> dict[str, str]:
    return _run_meta(model, input_size, _WeightUses).uses
