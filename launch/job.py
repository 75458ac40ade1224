"""The callable every executor runs for one run folder: ``TrainJob()(config, run_dir, parent_dir)``.

It is a ``submitit.helpers.Checkpointable``: on preemption or timeout submitit calls
``checkpoint()``, which resubmits the same call; ``bip.train.train`` then resumes from the
run's last ``checkpoint.pt`` (saved every epoch), so a requeued run ends where an
uninterrupted one would. With more than one task (nodes x tasks_per_node > 1) every task runs
the same call and the process group comes from the Slurm (or submitit local) environment.
Configs travel as plain dicts (``Config.to_dict()``); torch is imported only inside the job.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import submitit

from bip import identity
from bip.config import Config, build_config


class BlockedError(RuntimeError):
    """The parent run has no result.json: this run cannot start (reported as blocked)."""


def config_from_dict(values: dict) -> Config:
    return build_config([(f"{section}.{key}", value, "job")
                         for section, fields in values.items() for key, value in fields.items()])


class TrainJob(submitit.helpers.Checkpointable):
    """Train one run; returns a small summary (the full result is the run's result.json)."""

    def __init__(self, max_requeues: int = 3):
        self.max_requeues = max_requeues

    def __call__(self, config: dict, run_dir: str, parent_dir: str | None = None,
                 export: dict | None = None) -> dict:
        if parent_dir and not (Path(parent_dir) / identity.RESULT).is_file():
            # Written nowhere on purpose: the run folder keeps only its config, so the
            # status reads "blocked" (parent failed), not "failed"; Slurm still sees an error.
            raise BlockedError(f"blocked: parent run {parent_dir} has no {identity.RESULT}")
        rank, world = _export_distributed_env()
        _limit_threads()
        from bip.train import train  # torch: only on the node
        digest = _StateDigest() if world > 1 else None
        result = train(config_from_dict(config), Path(run_dir), hook=digest)
        if export and rank == 0:
            from bip.export import export_finished_run  # the grid's export stage (gridfile.py)
            export_finished_run(Path(run_dir), export, log=lambda text: print(text, file=sys.stderr))
        summary = {"run_dir": run_dir, "rank": rank, "world_size": world,
                   "test_acc": result.get("test_acc"), "state_digest": digest.value if digest else None}
        if digest and digest.value:
            print(f"rank {rank}/{world}: model state digest {digest.value}", file=sys.stderr, flush=True)
        return summary

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission | None:
        # Preemption or timeout: requeue the same call. Nothing to save here: train() wrote
        # checkpoint.pt at the end of the last epoch and resumes from it exactly.
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.max_requeues:
            print(f"not requeued: {restarts} requeues already (max_requeues {self.max_requeues})",
                  file=sys.stderr, flush=True)
            return None  # submitit then fails the job
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _export_distributed_env() -> tuple[int, int]:
    """(rank, world size); for multi-task jobs exports RANK, WORLD_SIZE, MASTER_ADDR, ... from
    the job environment, which accelerate reads to build the process group."""
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (in-process debug runs)
        return 0, 1
    if env.num_tasks <= 1:
        return 0, 1
    dist = submitit.helpers.TorchDistributedEnvironment()
    # CUDA_VISIBLE_DEVICES is left as Slurm set it: accelerate picks cuda:(LOCAL_RANK mod the
    # visible count), right whether a task sees all of its node's GPUs or only its own.
    dist.export(set_cuda_visible_devices=False, overwrite=True)
    return dist.rank, dist.world_size


def _limit_threads() -> None:
    """Use the CPUs Slurm granted (clusters without cgroups let torch see every core)."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit():
        import torch
        torch.set_num_threads(int(cpus))


class _StateDigest:
    """Train hook: a hash of the model state (weights, scores, masks, BN statistics) after each
    epoch, so the ranks of a multi-process run can be checked to agree."""

    def __init__(self):
        self.value = None

    def __call__(self, event: str, info: dict) -> None:
        if event != "epoch":
            return
        h = hashlib.sha1()
        for name, tensor in sorted(info["model"].state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.value = h.hexdigest()[:16]
