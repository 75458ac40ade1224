"""Training: the one loop (loop.py) over a Method, its state and checkpoints (state.py), where a
run starts from (sources.py), evaluation and reporting (evaluate.py, report.py), the process
group (distributed.py), the guards and accounting of a step (nonfinite.py, compute.py) and
experiment trackers (tracking.py). ``python -m bip.train`` is cli.py.

``train`` and ``main`` are the entry points the launcher (launch/job.py) and the ``bip-train``
console script call.
"""
from bip.train.cli import main
from bip.train.loop import train

__all__ = ["main", "train"]
