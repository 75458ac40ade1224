"""Compute accounting: how many training passes, FLOPs and seconds a run (and its lineage) cost.

Conventions (README "Compute accounting"):
- a *forward* / *backward* pass is one training example through the model's forward / backward,
  counted by the method where it calls them (bip.methods: ``_forward`` / ``_backward``), summed
  over all processes (each rank reads an equal shard of the global batch, so the global count is
  the local count times the world size: no communication);
- ``train_passes`` = (forward + 2 x backward) / 3: training passes of one example (one forward
  and one backward each; a backward costs two forwards, so a forward-only pass counts 1/3).
  Per step and example: dense / finetune / IMP / HYDRA / BiP fused 1, BiP paper 2, BiP reference 10/3
  (4 forwards, 3 backwards); one-shot OMP / random 0. Evaluation is not counted;
- ``train_flops`` = 2 FLOPs per MAC x effective MACs per example (the kept weights times their
  output positions, bip.export.macs_from_positions) x (forwards + 2 x backwards). The MACs are
  measured at the end of every epoch and apply to that epoch's passes: exact for fixed masks
  (pretrain, finetune, IMP rounds), the epoch-end mask for methods whose mask moves every step
  (HYDRA, BiP: the kept count is fixed at k, only where the weights sit changes);
- ``lineage_*`` adds the parent's published ``lineage_*`` (a pretrain -> prune -> finetune chain,
  or all IMP rounds so far); unknown (None) when the parent's result predates this accounting.
  A run without a bip parent (a pretrain, or a prune from a plain weights file) starts its own
  lineage.

Counting is host-side ints (batch shapes), so a training step never waits for the device; the
counters live in the loop state and so in every checkpoint (exact resume).
"""
from __future__ import annotations

FIELDS = ("forward", "backward", "epoch_forward", "epoch_backward", "flops")


def new() -> dict:
    return {k: 0 for k in FIELDS}


def add_step(counts: dict, passes: tuple[int, int], world: int) -> None:
    """Fold one step's local (forward, backward) example passes into ``counts``."""
    forward, backward = passes[0] * world, passes[1] * world
    counts["forward"] += forward
    counts["backward"] += backward
    counts["epoch_forward"] += forward
    counts["epoch_backward"] += backward


def close_epoch(counts: dict, macs_effective: int) -> None:
    """The epoch's passes at the epoch-end effective MACs (see the module docstring)."""
    counts["flops"] += 2 * macs_effective * (counts["epoch_forward"] + 2 * counts["epoch_backward"])
    counts["epoch_forward"] = counts["epoch_backward"] = 0


def passes(counts: dict) -> float:
    value = (counts["forward"] + 2 * counts["backward"]) / 3
    return int(value) if value == int(value) else round(value, 3)


def epoch_fields(counts: dict) -> dict:
    """What metrics.jsonl (and a tracker) gets at an epoch end: this run so far."""
    return {"train_passes": passes(counts), "train_flops": counts["flops"]}


def result_fields(counts: dict, wall_time_s: float, parent: dict | None) -> dict:
    """result.json's compute fields; ``parent`` is the parent's published result.json (None
    when the run has no bip parent, e.g. a pretrain)."""
    own = {"train_forward_passes": counts["forward"], "train_backward_passes": counts["backward"],
           "train_passes": passes(counts), "train_flops": counts["flops"]}
    lineage = {"train_passes": own["train_passes"], "train_flops": own["train_flops"],
               "wall_time_s": wall_time_s}
    if parent is not None:
        for key in lineage:
            before = parent.get(f"lineage_{key}", None)
            lineage[key] = None if before is None else round(before + lineage[key], 3)
    return {**own, **{f"lineage_{k}": v for k, v in lineage.items()}}
