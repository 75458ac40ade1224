"""Turning a finished run into files: dense.pt, thin.pt (physically thinned), ONNX, N:M sparse
weights and latency. ``python -m bip.export RUN_DIR``; the launcher calls ``export_finished_run``."""
from bip.export.run import export_finished_run, load_thinned

__all__ = ["export_finished_run", "load_thinned"]
