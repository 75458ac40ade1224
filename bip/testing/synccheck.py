"""Find the operations that make the host wait for the device, on any device (CPU included).

On a GPU, ``tensor.item()``, ``int(tensor)``, ``.nonzero()``, boolean-mask indexing, ops whose
output shape depends on the data and copies to the host all block the Python thread until the
device has caught up, so the device idles while the host prepares the next step. On CPU nothing
waits, which hides these calls; ``SyncRecorder`` makes them visible everywhere by recording them
at the dispatcher (``TorchDispatchMode``), so a CPU test can prove a training step free of them.
``torch.cuda.set_sync_debug_mode("error")`` is the CUDA-side check (benchmarks/gpu_check.sh).

    with SyncRecorder() as rec:
        method.step(batches, progress)
    assert not rec.events, rec.events

``tolist()``, ``numpy()`` and ``__array__`` read tensor memory without going through the
dispatcher; they are patched for the duration of the block so they are recorded too.
"""
from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that always need the values on the host: a Python scalar, or an output whose size
# depends on the data (the host must learn the size before it can allocate).
SYNC_OPS = {
    aten._local_scalar_dense,                      # .item(), int(t), float(t), bool(t), if t:
    aten.is_nonzero, aten.equal, aten.allclose,    # Python bools
    aten.nonzero, aten.nonzero_static, aten.masked_select, aten.argwhere,
    aten.unique_dim, aten._unique, aten._unique2, aten.unique_consecutive,
    aten.bincount,                                 # output length = max(input) + 1
    aten.repeat_interleave,                        # without output_size
    aten.histc,                                    # CUDA: min/max read back when not given
}
_SAFE_IF = {aten.nonzero_static}  # static size given: no sync
_HOST_READS = ("tolist", "numpy", "__array__")


def _is_bool_tensor(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.bool


class SyncRecorder(TorchDispatchMode):
    """Records every op that would force a device-to-host sync; ``events`` lists
    (op name, short stack) in order. Nothing is changed: ops run as usual."""

    def __init__(self, stack: bool = True):
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self._stack = stack
        self._saved: dict[str, object] = {}

    # -- recording ------------------------------------------------------------------------
    def _record(self, what: str) -> None:
        where = ""
        if self._stack:
            frames = [f for f in traceback.extract_stack()[:-3]
                      if "/torch/" not in f.filename and "synccheck" not in f.filename]
            where = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in frames[-3:][::-1])
        self.events.append((what, where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in SYNC_OPS and packet not in _SAFE_IF:
            if not (packet is aten.repeat_interleave and kwargs.get("output_size") is not None):
                self._record(str(func))
        elif packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(_is_bool_tensor(i) for i in indices or ()):
                self._record(f"{func} (boolean-mask indexing)")
        elif packet in (aten._to_copy, aten.copy_):
            src = args[1] if packet is aten.copy_ else args[0]
            dst = args[0].device if packet is aten.copy_ else kwargs.get("device")
            if (isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None
                    and torch.device(dst).type == "cpu"):
                self._record(f"{func} (device -> host copy)")
        return func(*args, **kwargs)

    # -- host reads that bypass the dispatcher --------------------------------------------
    def __enter__(self):
        for name in _HOST_READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def patched(tensor, *a, _name=name, _original=original, **kw):
                self._record(f"Tensor.{_name}")
                return _original(tensor, *a, **kw)
            setattr(torch.Tensor, name, patched)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, original in self._saved.items():
                setattr(torch.Tensor, name, original)
            self._saved.clear()

    def summary(self) -> str:
        return "; ".join(f"{op} at {where}" for op, where in self.events) or "no syncs"
