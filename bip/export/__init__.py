"""Turning a finished run into files: dense.pt, thin.pt (physically thinned), ONNX, N:M sparse
weights and latency. ``python -m bip.export RUN_DIR``; the launcher calls ``export_finished_run``.

The names below load bip.export.run (and torch) on first use, so that the launcher can import
bip.export.options (a grid's export options) without torch."""
from __future__ import annotations

__all__ = ["export_finished_run", "load_thinned"]


def __getattr__(name: str):
    if name in __all__:
        from bip.export import run
        return getattr(run, name)
    raise AttributeError(f"module 'bip.export' has no attribute {name!r}")
