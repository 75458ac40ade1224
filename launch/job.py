"""The callable every executor runs for one run folder: ``TrainJob()(config, run_dir, parent_dir)``.

Preemption, requeue and timeout (a ``submitit.helpers.Checkpointable``):

- SIGTERM (``scontrol requeue``, preemption, ``scancel``) and SIGUSR2 (submitit's
  ``--signal``, sent before the time limit) only set a flag (bip.rundir.boundary.request_stop). The
  loop checkpoints at its next step boundary (all ranks agree on the step) and stops.
- After a USR2, submitit's own handler then runs: it tells a timeout from a preemption, counts
  timeouts against ``max_requeues`` (submitit's ``max_num_timeout``; preemptions never count),
  calls ``checkpoint()`` (the state is already saved) and requeues the job.
- After a SIGTERM alone Slurm requeues (or cancels) the job itself: the task waits a little for
  a USR2 that may follow (submitit's simulated preemption sends both), then exits.

A run whose folder another live trainer holds (a duplicate job) waits for it, then returns its
result; a run whose parent is still running (leased) waits too. A run whose parent failed
raises BlockedError (reported as blocked). Configs travel as plain dicts; torch is imported
only inside the job.
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import submitit

from bip.rundir import boundary
from bip.rundir import folder as runfolder
from bip.config import Config, build_config
from bip.errors import BipError

WAIT_POLL_S = 10.0


class BlockedError(RuntimeError):
    """The parent run did not finish: this run cannot start (reported as blocked)."""


def config_from_dict(values: dict) -> Config:
    return build_config([(f"{section}.{key}", value, "job")
                         for section, fields in values.items() for key, value in fields.items()])


class TrainJob(submitit.helpers.Checkpointable):
    """Train one run; returns a small summary (the full result is the run's result.json)."""

    def __init__(self, max_requeues: int = 3):
        self.max_requeues = max_requeues  # the executor's max_num_timeout enforces it

    def __call__(self, config: dict, run_dir: str, parent_dir: str | None = None,
                 export: dict | None = None) -> dict:
        rank, world = _export_distributed_env()
        _limit_threads()
        submitit_usr2 = _take_signals()
        cfg = config_from_dict(config)
        if parent_dir:
            _wait_for_parent(Path(parent_dir), cfg.run.lease_stale_min)
        from bip.train import train  # torch: only on the node
        digest = _StateDigest() if world > 1 else None
        while True:
            try:
                result = train(cfg, Path(run_dir), hook=digest)
                break
            except runfolder.LeaseHeld as err:  # a duplicate job: let the owner finish
                print(f"waiting: {err}", file=sys.stderr, flush=True)
                _sleep_unless_stopped(WAIT_POLL_S)
            except boundary.Interrupted:
                _stop(submitit_usr2, rank)
            except runfolder.FencedOut:
                raise  # another trainer owns the folder now: record nothing in it
            except BipError as err:
                if rank == 0 and runfolder.record_setup_error(Path(run_dir), err):
                    print(f"error: {err}", file=sys.stderr, flush=True)
                raise
        if export and rank == 0:
            from bip.export import export_finished_run  # the grid's export stage (gridfile.py)
            export_finished_run(Path(run_dir), export, log=lambda text: print(text, file=sys.stderr))
        summary = {"run_dir": run_dir, "rank": rank, "world_size": world,
                   "test_acc": result.get("test_acc"), "state_digest": digest.value if digest else None}
        if digest and digest.value:
            print(f"rank {rank}/{world}: model state digest {digest.value}", file=sys.stderr, flush=True)
        return summary

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # Called by submitit's USR2 handler, after the loop saved its step checkpoint: requeue
        # the same call (submitit decides whether the timeout budget allows it).
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _take_signals():
    """Inside a submitit job, SIGTERM and SIGUSR2 become stop requests; returns submitit's USR2
    handler (or None). In-process (debug) runs keep the caller's handlers."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    previous = boundary.install_stop_signals(signal.SIGTERM, signal.SIGUSR2)[signal.SIGUSR2]
    return previous if callable(previous) else None


def _stop(submitit_usr2, rank: int) -> None:
    """After the loop saved the checkpoint of a stop request: requeue (USR2: through submitit's
    handler, which counts timeouts) or let Slurm end the job (SIGTERM). Does not return."""
    deadline = time.time() + 20  # a USR2 may follow the SIGTERM of a simulated preemption
    while submitit_usr2 and "SIGUSR2" not in boundary.stop_signals() and time.time() < deadline:
        time.sleep(0.2)
    if "SIGUSR2" in boundary.stop_signals() and submitit_usr2 is not None:
        submitit_usr2(signal.SIGUSR2, None)  # rank 0: requeues and exits; others return
        time.sleep(120)  # the requeue ends this task
    print(f"stopped by {', '.join(boundary.stop_signals())} after a checkpoint; exiting",
          file=sys.stderr, flush=True)
    sys.exit(128 + signal.SIGTERM)


def _wait_for_parent(parent: Path, stale_min: float) -> None:
    """Return once the parent run is done; wait while a live trainer holds it; else blocked."""
    while True:
        found = runfolder.inspect(parent)
        if found.state == "done":
            return
        if not runfolder.lease_live(found.owner):
            raise BlockedError(f"blocked: parent run {parent} did not finish ({found.state})")
        print(f"waiting for the parent run {parent} ({runfolder.owner_line(parent, found.owner)})",
              file=sys.stderr, flush=True)
        _sleep_unless_stopped(WAIT_POLL_S)


def _sleep_unless_stopped(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if boundary.stop_reason():
            print("stopped while waiting; exiting", file=sys.stderr, flush=True)
            sys.exit(128 + signal.SIGTERM)
        time.sleep(0.5)


def _export_distributed_env() -> tuple[int, int]:
    """(rank, world size); for multi-task jobs exports RANK, WORLD_SIZE, MASTER_ADDR, ... from
    the job environment, which accelerate reads to build the process group."""
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (in-process debug runs, local workers)
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
