"""Speed options of the training step: channels_last memory format and torch.compile.

Both change how the same computation runs, never what it computes beyond float round-off, so
they are not hashed into run ids (like the device), and both default off: on a CPU they do not
pay (compile costs minutes; oneDNN runs NCHW well). ``benchmarks/gpu_check.sh`` measures them on
a GPU (README, "GPU"). ``prepare_model`` is the one call site, right after the model is built:

- ``channels_last``: every 4-D parameter and buffer (weights, scores, masks) in NHWC memory,
  and a forward pre-hook that hands the model its 4-D inputs in NHWC, so the loaders stay as
  they are. The mask selection reads the scores in their logical (NCHW) order whatever their
  memory layout (bip.pruning.masking), so ties break as before and the masks are the same. It must run
  BEFORE a Method is made: converting re-creates each tensor's storage, which would undo the
  reference variant's score/weight aliasing.
- ``compile``: ``torch.compile`` of the model's forward, in place (``nn.Module.compile``: the
  state dict keeps its names and the optimizers their parameters; DDP wraps it as usual). The
  mask is a buffer, i.e. a graph input: a new mask is new data, not a new graph. What the
  forward branches on (BiP's per-pass ``grad_target``, the reference variant's requires_grad
  switches, train / eval, grad mode) is guarded: each distinct pass kind gets its own graph,
  compiled the first time it is seen, and looked up afterwards. A pass kind must differ
  anyway, since the tensors it differentiates decide the backward graph. So a BiP step compiles
  its two graphs in the first step and never again (tests/test_speed.py proves it with a
  compile counter over steps whose masks change). The mask selection runs outside the compiled
  forward, as device ops. Under DDP, BiP's upper pass hands g to bip.methods.gsync from inside the
  masked layers' backward, a side effect dynamo cannot put in a graph: that pass runs with one
  graph break per masked layer (correct, slower); single-process runs have none.
"""
from __future__ import annotations

import torch
import torch.nn as nn

# Graph kinds one process may hold for one model class: train passes (BiP: 2, its reference
# variant: 4) x precision x eval / probe shapes, and several models in one process (the --debug
# executor, benchmarks). Past torch's default (8) dynamo silently runs the forward uncompiled.
RECOMPILE_LIMIT = 64


def prepare_model(model: nn.Module, train_cfg) -> nn.Module:
    """Apply ``train.channels_last`` and ``train.compile`` to ``model`` in place; returns it.
    Call before creating the Method (see the module docstring)."""
    if train_cfg.channels_last:
        to_channels_last(model)
    if train_cfg.compile:
        compile_model(model, train_cfg.compile_backend)
    return model


def _nhwc_input(module: nn.Module, args: tuple):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last),) + tuple(args[1:])
    return None


def to_channels_last(model: nn.Module) -> nn.Module:
    """4-D parameters and buffers in channels_last, and 4-D inputs converted on the way in."""
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_nhwc_input)
    return model


def compile_model(model: nn.Module, backend: str | object = "inductor", **options) -> nn.Module:
    """``torch.compile`` the forward of ``model`` in place (module docstring)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    model.compile(backend=backend, **options)
    return model
