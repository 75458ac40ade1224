"""The one training loop: build -> claim the folder -> resume -> epochs -> publish.

``train(cfg, run_dir)`` is the library entry point the launcher calls (``python -m bip.train``
is bip/train/__main__.py). A run writes only its own folder, and only while it holds the
folder's lease; its lifecycle (lease, step checkpoints, start history, publishing final.pt +
result.json) is bip/rundir's. A done run (result.json and final.pt intact) is returned without
training; a run with a ``checkpoint.pt`` resumes from it at the exact step; a damaged one is
repaired.
"""
from __future__ import annotations

import os
import socket
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from bip.config import Config, identity
from bip.data import describe_dataset, load_dataset
from bip.data.loaders import build_loaders
from bip.errors import BipError
from bip.methods import imp_levels
from bip.methods.registry import create_method
from bip.models import create_model, model_builder, model_options
from bip.models.accounting import layer_positions
from bip.pruning import collapse, masking
from bip.rundir import checkpoint, diskerror
from bip.rundir import folder as runfolder
from bip.rundir.boundary import Action, Interrupted, StepBoundary, stop_reason
from bip.rundir.origin import own_git_state, slurm_job_id
from bip.rundir.provenance import provenance, seed_everything
from bip.train import compute, report, tracking
from bip.train.compile import prepare_model
from bip.train.distributed import Ranks, check_checkpoint, check_processes, sync_batchnorm
from bip.train.nonfinite import NonFiniteGuard
from bip.train.sources import load_source, model_input, parent_result, rewind_epoch, source_path
from bip.train.state import TrainState, final_file, resume_file, seed_checkpoint

Hook = Callable[[str, dict], None]


def train(cfg: Config, run_dir: str | Path | None = None, hook: Hook | None = None) -> dict:
    """Run, resume, or return the finished result of one stage; returns result.json.

    Everything that can be wrong with the command is checked before the folder is touched;
    then the main rank takes the folder's lease (bip/rundir/lease.py), which a second trainer
    finds held (BipError naming the owner). The run resumes from its own checkpoint.pt at the
    exact step, or from ``run.resume`` when it has none. A stop request (a Slurm signal, see
    launch/job.py) checkpoints at the next step boundary and raises Interrupted. Every write
    goes through the folder's fence (bip/rundir/fence.py): a trainer whose lease a newer one
    took over (it was paused, or too slow to beat) raises FencedOut, a BipError naming the new
    owner, at its next write or step boundary, and writes nothing more (no error.json either)."""
    run_dir = Path(run_dir) if run_dir is not None else identity.run_dir(cfg)
    folder = runfolder.RunFolder(run_dir, cfg.run.lease_stale_min)
    # What kind of thing --resume names is checked before the done shortcut (a folder without a
    # checkpoint is a wrong command whatever this run's state); its content only where it seeds
    # the run: a folder with its own checkpoint (a done run keeps it) resumes from that instead.
    if cfg.run.resume:
        resume_file(cfg.run.resume)
    done = folder.done_result()
    if done is not None:
        return done
    folder.check_free()
    ranks = Ranks(_accelerator(cfg))
    folder.main = ranks.main
    job = _build(cfg, run_dir, ranks)
    created = diskerror.new_folders(run_dir) if ranks.main else []
    try:
        done = _claim(folder, ranks)
        if done is not None:
            return done
        state = _restore(cfg, folder, job, ranks)
        folder.start(identity.config_yaml(cfg, provenance(ranks.accelerator)), _start_entry(cfg, state),
                     state.epoch)
        job.tracker = tracking.open_tracker(cfg, run_dir, identity.run_id(cfg), ranks.main)
        return _train(job, folder, state, ranks, hook)
    except Exception as err:
        fenced = None if isinstance(err, runfolder.FencedOut) else folder.fenced_out()
        if fenced is not None:  # whatever broke, the folder is another trainer's now: say so
            raise fenced from None
        folder.fail(err, ranks.index)
        raise
    finally:
        job.tracker.close()
        diskerror.remove_unstarted(folder, created)  # a start that could not even write config.yaml
        folder.release()


class _Run:
    """What a run is made of (built and validated before the folder is touched)."""

    def __init__(self, cfg, model, method, loaders, seed_ckpt, parent_result):
        self.cfg, self.model, self.method, self.loaders, self.seed_ckpt = cfg, model, method, loaders, seed_ckpt
        self.parent_result = parent_result  # the parent's published result.json (lineage compute)
        self.tracker = tracking.Tracker()   # train.log_with's, opened once the folder is ours
        self.positions = layer_positions(model, loaders.input_shape)  # for the MACs of each epoch


def _build(cfg: Config, run_dir: Path, ranks: Ranks) -> _Run:
    check_processes(cfg, ranks.world)
    seed_everything(cfg.run.seed, cfg.train.deterministic)
    # Cheap checks first: a typo should not wait for the dataset to load.
    model_builder(cfg.model.arch)
    tracking.check(cfg)
    source = source_path(cfg, Path(cfg.run.result_dir))
    own = (run_dir / identity.CHECKPOINT).is_file()
    seed_ckpt = seed_checkpoint(cfg) if cfg.run.resume and not own else None
    # ffcv brings its own images: only the dataset's description is needed (no raw files).
    spec = (describe_dataset if cfg.data.loader == "ffcv" else load_dataset)(cfg.data, cfg.model.num_classes)
    spec = model_input(cfg, spec)
    # On the device, in its memory format and compiled (bip.train.compile) before any aliasing
    # (reference BiP) or optimizer references are made.
    model = create_model(cfg.model.arch, spec.num_classes, cfg.prune.layer_type, **model_options(cfg.model))
    model = prepare_model(sync_batchnorm(cfg, model, ranks.device).to(ranks.device), cfg.train)
    if source is not None:
        load_source(cfg, model, source)
    elif cfg.run.stage != "pretrain" and not (own or seed_ckpt):
        raise BipError(f"stage {cfg.run.stage} needs a source: --source-net CKPT or run.parent=RUN_ID")
    parent = parent_result(source)
    imp_source = None
    if cfg.run.stage == "prune" and cfg.prune.method == "imp":
        density, round_, rewind = imp_levels.source(source, parent)
        imp_source = imp_levels.Source(density, round_, checkpoint.source_state(rewind)[0])
    method = create_method(cfg, model, imp_source)
    loaders = build_loaders(cfg.data, spec, seed=cfg.run.seed, streams=method.streams,
                            rank=ranks.index, world=ranks.world, device=ranks.device)
    method.attach(ranks.wrap(model), ranks.accelerator)
    return _Run(cfg, model, method, loaders, seed_ckpt, parent)


def _claim(folder: runfolder.RunFolder, ranks: Ranks) -> dict | None:
    """The main rank takes the lease; every rank learns the outcome (one broadcast at start)."""
    outcome, failed = ("ok", None, None), None
    if ranks.main:
        try:
            done = folder.claim()
            outcome = ("done" if done is not None else "ok", done, folder.fence_id())
        except diskerror.DiskError as err:  # not "busy": a launcher job waits for a busy folder
            outcome, failed = ("disk", str(err), None), err
        except runfolder.LeaseHeld as err:
            outcome = ("busy", str(err), None)
        except BipError as err:  # e.g. an owner.json that is a directory: no waiting helps
            outcome = ("error", str(err), None)
    kind, value, fence_id = ranks.broadcast(outcome)
    if kind in ("busy", "error"):
        raise (runfolder.LeaseHeld if kind == "busy" else BipError)(value)
    if kind == "disk":
        raise failed or diskerror.DiskError(value)
    if not ranks.main:  # every rank writes (its error file) only while the lease holds
        folder.adopt(*fence_id)
    folder.owned = True  # by this run (the main rank holds the lease)
    return value


def _restore(cfg: Config, folder: runfolder.RunFolder, job: _Run, ranks: Ranks) -> TrainState:
    """Training state: the folder's own checkpoint (a damaged one is moved aside; the main rank
    decides), else the --resume seed, else a fresh start."""
    own = folder.path / identity.CHECKPOINT
    ckpt = None
    if own.is_file() and ranks.main:
        try:
            ckpt = checkpoint.load(own, "checkpoint")
        except BipError:
            folder.set_aside(identity.CHECKPOINT)
        if ckpt is not None and _rewind_lost(cfg, folder, ckpt):
            ckpt = None
    state = TrainState()
    if ranks.broadcast(ckpt is not None):
        ckpt = ckpt if ckpt is not None else checkpoint.load(own, "checkpoint")
        check_checkpoint(ckpt.get("meta"), cfg, own)
        state = TrainState.from_checkpoint(ckpt, own, job.method)
        state.resumed_from = identity.CHECKPOINT
    elif job.seed_ckpt is not None:
        state = TrainState.from_checkpoint(job.seed_ckpt, resume_file(cfg.run.resume), job.method)
        state.resumed_from = cfg.run.resume
    if not ranks.main:  # the saved sums are all ranks': the main rank carries them
        state.totals = {}
    if state.resumed_from:
        report.Progress(ranks.main, 1).line(
            f"resuming from {state.resumed_from}: epoch {state.epoch + 1}, step "
            f"{state.step_in_epoch} of the epoch (global step {state.step})")
    return state


def _rewind_lost(cfg: Config, folder: runfolder.RunFolder, ckpt: dict) -> bool:
    """A pretrain checkpoint past its rewind epoch without rewind.pt: older bip saved the epoch's
    checkpoint before rewind.pt, so a full disk could lose the rewind state for good. Only a
    run from the start computes it again exactly; the checkpoint stays until the first save."""
    if cfg.run.stage != "pretrain" or (folder.path / identity.REWIND).is_file():
        return False
    try:
        epoch, step = int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", 0))
    except (KeyError, TypeError, ValueError):
        return False  # TrainState.from_checkpoint says what is wrong with it
    if (epoch, step) <= (rewind_epoch(cfg), 0):
        return False
    report.Progress(folder.main, 1).line(
        f"{folder.path / identity.CHECKPOINT} is past the rewind epoch {rewind_epoch(cfg)} but "
        f"{identity.REWIND} is missing (an earlier write failed): training again from the start "
        f"to write it")
    return True


def _start_entry(cfg: Config, state: TrainState) -> dict:
    """This start's line in config.yaml's history."""
    entry = {**own_git_state(), "host": socket.gethostname(), "pid": os.getpid(),
             "slurm_job_id": slurm_job_id(),
             "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "resumed_at": {"epoch": state.epoch, "step_in_epoch": state.step_in_epoch}
             if state.resumed_from else None}
    if state.resumed_from and state.resumed_from != identity.CHECKPOINT:
        entry["seeded_from"] = state.resumed_from
        entry["resume_foreign"] = cfg.run.resume_foreign
    return entry


def _train(job: _Run, folder: runfolder.RunFolder, state: TrainState, ranks: Ranks,
           hook: Hook | None) -> dict:
    cfg, method, model, loaders = job.cfg, job.method, job.model, job.loaders
    start_time, epochs = time.time(), method.epochs()
    steps = min(len(loaders.streams[0]), cfg.train.steps_per_epoch or len(loaders.streams[0]))
    log = report.Progress(ranks.main, cfg.run.print_freq)
    guard = NonFiniteGuard(method.core, method.optimizers.values(), cfg.train.max_nonfinite_steps,
                           ranks.device, state.nonfinite_steps)

    def check_guard() -> None:  # never checkpoint a diverged state
        state.nonfinite_steps = guard.check(state.epoch)
    boundary = StepBoundary(folder, cfg.train.checkpoint_every_min, ranks.world, check_guard)
    if _at_rewind(cfg, state):  # resumed at the rewind point (or rewind_epoch=0): write it if missing
        rewind = state.to_checkpoint(cfg, method)  # every rank: it may reduce the running sums
        if not (folder.path / identity.REWIND).is_file():
            folder.save(identity.REWIND, rewind)
    last = None
    for epoch in range(state.epoch, epochs):
        t0, first = time.time(), state.step_in_epoch
        if first == 0:  # a resumed epoch already had its start (IMP rewinds weights there)
            method.on_epoch_start(epoch)
        model.train()
        batches = zip(*(stream.epoch(epoch, start=first) for stream in loaders.streams))
        for i, batch in enumerate(log.wrap(batches, steps - first, f"epoch {epoch + 1}/{epochs}"), first):
            if i >= steps:
                break
            guard.before_step()
            stats = method.step(list(batch), epoch + i / steps)
            guard.after_step(stats["loss"], state.step)
            compute.add_step(state.compute, method.take_passes(), ranks.world)
            state.totals = {k: state.totals.get(k, 0) + v for k, v in stats.items()}
            state.step, state.step_in_epoch = state.step + 1, i + 1
            if state.step % cfg.run.print_freq == 0:  # a logging point: the one sync allowed
                guard.check(epoch)
            if hook:
                hook("step", {"epoch": epoch, "step": state.step, "model": model})
            action = boundary.poll()
            if action != Action.GO:
                _save(folder, state.to_checkpoint(cfg, method, state.epoch_time_s + time.time() - t0), boundary)
            if action == Action.STOP:
                log.line(f"stop requested ({stop_reason() or 'by another rank'}): checkpoint saved at "
                         f"epoch {state.epoch + 1}, step {state.step_in_epoch} of the epoch")
                ranks.barrier()
                raise Interrupted(state.step)
        state.nonfinite_steps = guard.check(epoch)  # before anything of this epoch is saved
        last = report.end_epoch(job, state, ranks, log, started=t0)
        state.end_epoch()
        _publish_epoch(job, folder, state, last, boundary, log, epochs)
        if hook:
            hook("epoch", {"epoch": epoch + 1, "metrics": last, "model": model})
    if last is None:  # nothing trained (one-shot methods, or epochs=0): evaluate once
        last = report.end_epoch(job, state, ranks, log)
        collapse.enforce(last, cfg.prune.on_collapse, "mask")
        job.tracker.log(last, 0)
        folder.save(identity.CHECKPOINT, state.to_checkpoint(cfg, method))
    return _finish(job, folder, state, last, ranks, log, time.time() - start_time)


def _publish_epoch(job: _Run, folder, state: TrainState, row: dict, boundary, log, epochs: int) -> None:
    """An epoch's outputs: its metrics line, the rewind point of a pretrain, the epoch
    checkpoint, then the collapse policy. rewind.pt comes before the checkpoint: while it is
    not written (a full disk), the checkpoint stays before the rewind epoch, so the resumed
    run trains to it again and writes it."""
    cfg, epoch = job.cfg, state.epoch
    if folder.main:
        folder.append_metrics(row)
        job.tracker.log(row, epoch)
        log.line(f"epoch {epoch}/{epochs} " + report.summary(row))
    ckpt = state.to_checkpoint(cfg, job.method)
    if _at_rewind(cfg, state):
        folder.save(identity.REWIND, ckpt)
    # Before the checkpoint, like rewind.pt: a checkpoint past this epoch implies its best.pt.
    if cfg.eval.select == "best_val" and state.best["epoch"] == epoch:
        folder.save(identity.BEST, {**final_file(cfg, job.method), "row": row})
    _save(folder, ckpt, boundary)
    collapse.enforce(row, cfg.prune.on_collapse, f"epoch {epoch}")


def _at_rewind(cfg: Config, state: TrainState) -> bool:
    """The state stands at the end of a pretrain's rewind epoch (the state rewind.pt holds)."""
    return cfg.run.stage == "pretrain" and state.step_in_epoch == 0 and state.epoch == rewind_epoch(cfg)


def _save(folder, ckpt: dict, boundary: StepBoundary) -> None:
    folder.save(identity.CHECKPOINT, ckpt)
    boundary.saved()


def _finish(job: _Run, folder, state: TrainState, last: dict, ranks: Ranks, log, elapsed: float) -> dict:
    if job.cfg.eval.select == "best_val" and state.best["epoch"]:
        last = _load_best(job, folder, ranks)
    result = report.result(job, state, last, ranks, elapsed)
    mask = report.mask_file(job.cfg, job.model, result["sparsity"]) if masking.masked_layers(job.model) else None
    result = folder.publish(final_file(job.cfg, job.method), result, mask)
    log.line(f"done: test_acc {result['test_acc']:.2f} " + (
        f"kept_fraction {result['sparsity']['kept_fraction']:.4f}" if result["sparsity"] else ""))
    ranks.wait()
    return result


def _load_best(job: _Run, folder, ranks: Ranks) -> dict:
    """eval.select=best_val: the best validation epoch's model (every rank reads the main rank's
    file) and its metrics row, which result.json then reports."""
    ranks.barrier()  # the main rank wrote it at the end of that epoch
    best = checkpoint.load(folder.path / identity.BEST, "best-epoch model")
    job.model.load_state_dict(best["model"])
    return best["row"]


def _accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    # Masks are buffers too: do not re-send every buffer at every forward (BN statistics are
    # averaged before each evaluation instead; the masks are identical on every rank). accelerate
    # only knows the flag's old name, which newer torch reports as deprecated.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers. is deprecated", category=FutureWarning)
    # Device placement and DDP only: mixed precision is per run (bip.methods.base.autocast), since
    # accelerate fixes one precision per process and a second run with another one would fail.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no",
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
