"""The one training loop: build -> claim the folder -> resume -> epochs -> publish.

``python -m bip.train`` takes the original BiP README's flags (``--configs --exp-mode --k
...``) plus ``section.key=value``; the last line it prints is the run folder. ``train(cfg,
run_dir)`` is the library entry point the launcher calls. A run writes only its own folder,
and only while it holds the folder's lease; its lifecycle (lease, step checkpoints, start
history, publishing final.pt + result.json) is bip/runfolder.py's. A done run (result.json
and final.pt intact) is returned without training; a run with a ``checkpoint.pt`` resumes
from it at the exact step; a damaged one is repaired.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bip import checkpoint, collapse, compute, identity, imp, masking, runfolder, tracking, world
from bip.config import Config, config_from_argv
from bip.data import check_dataset, describe_dataset, load_dataset
from bip.data.loaders import build_loaders
from bip.errors import BipError
from bip.export import layer_positions, macs_from_positions
from bip.methods import autocast, create_method
from bip.models import create_model, model_builder, model_options
from bip.models.external import input_defaults, is_external
from bip.names import check_root
from bip.nonfinite import NonFiniteGuard
from bip.provenance import git_state, provenance, seed_everything
from bip.speed import prepare_model

Hook = Callable[[str, dict], None]


def train(cfg: Config, run_dir: str | Path | None = None, hook: Hook | None = None) -> dict:
    """Run, resume, or return the finished result of one stage; returns result.json.

    Everything that can be wrong with the command is checked before the folder is touched;
    then the main rank takes the folder's lease (bip/runfolder.py), which a second trainer
    finds held (BipError naming the owner). The run resumes from its own checkpoint.pt at the
    exact step, or from ``run.resume`` when it has none. A stop request (a Slurm signal, see
    launch/job.py) checkpoints at the next step boundary and raises runfolder.Interrupted."""
    run_dir = Path(run_dir) if run_dir is not None else identity.run_dir(cfg)
    folder = runfolder.RunFolder(run_dir, cfg.run.lease_stale_min)
    done = folder.done_result()
    if done is not None:
        return done
    folder.check_free()
    accelerator = _accelerator(cfg)
    folder.main = accelerator.is_main_process
    job = _build(cfg, run_dir, accelerator)
    try:
        done = _claim(folder, accelerator)
        if done is not None:
            return done
        state = _restore(cfg, folder, job, accelerator)
        folder.start(identity.config_yaml(cfg, provenance(accelerator)), _start_entry(cfg, state),
                     state["epoch"])
        job.tracker = tracking.open_tracker(cfg, run_dir, identity.run_id(cfg), accelerator.is_main_process)
        return _train(cfg, folder, job, state, accelerator, hook)
    except Exception as err:
        folder.fail(err, accelerator.process_index)
        raise
    finally:
        job.tracker.close()
        folder.release()


class _Job:
    """What a run is made of (built and validated before the folder is touched)."""

    def __init__(self, model, method, loaders, seed_ckpt, parent_result):
        self.model, self.method, self.loaders, self.seed_ckpt = model, method, loaders, seed_ckpt
        self.parent_result = parent_result  # the parent's published result.json (lineage compute)
        self.tracker = tracking.Tracker()   # train.log_with's, opened once the folder is ours


def _build(cfg: Config, run_dir: Path, accelerator) -> _Job:
    world.check_processes(cfg, accelerator.num_processes)
    seed_everything(cfg.run.seed, cfg.train.deterministic)
    # Cheap checks first: a typo should not wait for the dataset to load.
    model_builder(cfg.model.arch)
    tracking.check(cfg)
    source = source_path(cfg, Path(cfg.run.result_dir))
    own = (run_dir / identity.CHECKPOINT).is_file()
    seed_ckpt = _seed_checkpoint(cfg) if cfg.run.resume and not own else None
    # ffcv brings its own images: only the dataset's description is needed (no raw files).
    spec = (describe_dataset if cfg.data.loader == "ffcv" else load_dataset)(cfg.data, cfg.model.num_classes)
    spec = model_input(cfg, spec)
    # On the device, in its memory format and compiled (bip.speed) before any aliasing
    # (reference BiP) or optimizer references are made.
    model = create_model(cfg.model.arch, spec.num_classes, cfg.prune.layer_type, **model_options(cfg.model))
    model = prepare_model(world.sync_batchnorm(cfg, model, accelerator.device).to(accelerator.device),
                          cfg.train)
    if source is not None:
        load_source(cfg, model, source)
    elif cfg.run.stage != "pretrain" and not (own or seed_ckpt):
        raise BipError(f"stage {cfg.run.stage} needs a source: --source-net CKPT or run.parent=RUN_ID")
    parent = parent_result(source)
    imp_source = None
    if cfg.run.stage == "prune" and cfg.prune.method == "imp":
        density, round_, rewind = imp.source(source, parent)
        imp_source = imp.Source(density, round_, checkpoint.source_state(rewind)[0])
    method = create_method(cfg, model, imp_source)
    loaders = build_loaders(cfg.data, spec, seed=cfg.run.seed, streams=method.streams,
                            rank=accelerator.process_index, world=accelerator.num_processes,
                            device=accelerator.device)
    method.attach(accelerator.prepare_model(model) if accelerator.num_processes > 1 else model,
                  accelerator)
    return _Job(model, method, loaders, seed_ckpt, parent)


def _claim(folder: runfolder.RunFolder, accelerator) -> dict | None:
    """The main rank takes the lease; every rank learns the outcome (one broadcast at start)."""
    outcome = ("ok", None)
    if accelerator.is_main_process:
        try:
            done = folder.claim()
            outcome = ("done", done) if done is not None else ("ok", None)
        except BipError as err:
            outcome = ("busy", str(err))
    if accelerator.num_processes > 1:
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if outcome[0] == "busy":
        raise runfolder.LeaseHeld(outcome[1])
    folder.owned = True  # by this run (the main rank holds the lease)
    return outcome[1]


def _restore(cfg: Config, folder: runfolder.RunFolder, job: _Job, accelerator) -> dict:
    """Training state: the folder's own checkpoint (a damaged one is moved aside; the main rank
    decides), else the --resume seed, else a fresh start."""
    own = folder.path / identity.CHECKPOINT
    ckpt = None
    if own.is_file() and accelerator.is_main_process:
        try:
            ckpt = checkpoint.load(own, "checkpoint")
        except BipError:
            folder.set_aside(identity.CHECKPOINT)
    usable = ckpt is not None
    if accelerator.num_processes > 1:
        box = [usable]
        dist.broadcast_object_list(box, src=0)
        usable = box[0]
    state = {"epoch": 0, "step": 0, "step_in_epoch": 0, "totals": {}, "epoch_time_s": 0.0,
             "best": {"val_acc": -1.0, "epoch": 0, "test_acc": None}, "wall_time_s": 0.0,
             "resumed_from": None, "nonfinite_steps": 0, "compute": compute.new()}
    if usable:
        ckpt = ckpt if ckpt is not None else checkpoint.load(own, "checkpoint")
        world.check_checkpoint(ckpt.get("meta"), cfg, own)
        state.update(_resume(ckpt, own, job.method), resumed_from="checkpoint.pt")
    elif job.seed_ckpt is not None:
        state.update(_resume(job.seed_ckpt, Path(cfg.run.resume), job.method), resumed_from=cfg.run.resume)
    if not accelerator.is_main_process:  # the saved sums are all ranks': the main rank carries them
        state["totals"] = {}
    if state["resumed_from"]:
        _Progress(accelerator.is_main_process, 1).line(
            f"resuming from {state['resumed_from']}: epoch {state['epoch'] + 1}, step "
            f"{state['step_in_epoch']} of the epoch (global step {state['step']})")
    return state


def _start_entry(cfg: Config, state: dict) -> dict:
    """This start's line in config.yaml's history."""
    entry = {**git_state(), "host": socket.gethostname(), "pid": os.getpid(),
             "slurm_job_id": runfolder.slurm_job_id(),
             "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "resumed_at": {"epoch": state["epoch"], "step_in_epoch": state["step_in_epoch"]}
             if state["resumed_from"] else None}
    if state["resumed_from"] and state["resumed_from"] != "checkpoint.pt":
        entry["seeded_from"] = state["resumed_from"]
        entry["resume_foreign"] = cfg.run.resume_foreign
    return entry


def _train(cfg: Config, folder: runfolder.RunFolder, job: _Job, state: dict, accelerator,
           hook: Hook | None) -> dict:
    method, loaders, model, main = job.method, job.loaders, job.model, accelerator.is_main_process
    start_time = time.time()
    epochs, steps = method.epochs(), len(loaders.streams[0])
    if cfg.train.steps_per_epoch:
        steps = min(steps, cfg.train.steps_per_epoch)
    log = _Progress(main, cfg.run.print_freq)
    cadence = runfolder.Cadence(cfg.train.checkpoint_every_min, accelerator.num_processes)
    guard = NonFiniteGuard(method.core, method.optimizers.values(), cfg.train.max_nonfinite_steps,
                           accelerator.device, state["nonfinite_steps"])
    positions = layer_positions(model, loaders.input_shape)  # for the MACs of each epoch
    processes = accelerator.num_processes
    last = None
    for epoch in range(state["epoch"], epochs):
        t0, first = time.time(), state["step_in_epoch"]
        if first == 0:  # a resumed epoch already had its start (IMP rewinds weights there)
            method.on_epoch_start(epoch)
        model.train()
        batches = zip(*(stream.epoch(epoch, start=first) for stream in loaders.streams))
        for i, batch in enumerate(log.wrap(batches, steps - first, f"epoch {epoch + 1}/{epochs}"), first):
            if i >= steps:
                break
            guard.before_step()
            stats = method.step(list(batch), epoch + i / steps)
            guard.after_step(stats["loss"], state["step"])
            compute.add_step(state["compute"], method.take_passes(), processes)
            state["totals"] = {k: state["totals"].get(k, 0) + v for k, v in stats.items()}
            state["step"], state["step_in_epoch"] = state["step"] + 1, i + 1
            if state["step"] % cfg.run.print_freq == 0:  # a logging point: the one sync allowed
                guard.check(epoch)
            if hook:
                hook("step", {"epoch": epoch, "step": state["step"], "model": model})
            _maybe_checkpoint(cfg, folder, method, state, cadence, time.time() - t0, log, guard)
        state["nonfinite_steps"] = guard.check(epoch)  # before anything of this epoch is saved
        last = _evaluate(model, loaders, accelerator, cfg)
        state["epoch_time_s"] += time.time() - t0
        totals = world.reduce_totals(state["totals"])  # every rank's shard
        last.update(epoch=epoch + 1, step=state["step"], time_s=round(state["epoch_time_s"], 3),
                    train_loss=_mean(totals, "loss"), train_acc=_mean(totals, "correct"))
        last.update(collapse.record(method.core, loaders.input_shape, f"epoch {epoch + 1}", log.line))
        compute.close_epoch(state["compute"], macs_from_positions(model, positions)["macs_effective"])
        last.update(compute.epoch_fields(state["compute"]))
        if last.get("val_acc", -1.0) > state["best"]["val_acc"]:
            state["best"] = {"val_acc": last["val_acc"], "epoch": epoch + 1, "test_acc": last["test_acc"]}
        state["wall_time_s"] += state["epoch_time_s"]
        state.update(epoch=epoch + 1, step_in_epoch=0, totals={}, epoch_time_s=0.0)
        if main:
            _append_metrics(folder.path / identity.METRICS, last)
            job.tracker.log(last, epoch + 1)
            log.line(f"epoch {epoch + 1}/{epochs} " + _summary(last))
        folder.save(identity.CHECKPOINT, _checkpoint(cfg, method, state))
        cadence.saved()
        if cfg.run.stage == "pretrain" and epoch + 1 == rewind_epoch(cfg):
            folder.save(identity.REWIND, _checkpoint(cfg, method, state))
        collapse.enforce(last, cfg.prune.on_collapse, f"epoch {epoch + 1}")
        if hook:
            hook("epoch", {"epoch": epoch + 1, "metrics": last, "model": model})
    if last is None:  # nothing trained (one-shot methods, or epochs=0): evaluate once
        last = _evaluate(model, loaders, accelerator, cfg)
        last.update(collapse.record(method.core, loaders.input_shape, "mask", log.line))
        collapse.enforce(last, cfg.prune.on_collapse, "mask")
        job.tracker.log(last, 0)
        folder.save(identity.CHECKPOINT, _checkpoint(cfg, method, state))
    result = _result(cfg, method, model, positions, state, last, accelerator, time.time() - start_time,
                     job.parent_result)
    layers = masking.masked_layers(model)
    mask = _mask_file(cfg, model, result["sparsity"]) if layers else None
    result = folder.publish(_final(cfg, method), result, mask)
    log.line(f"done: test_acc {result['test_acc']:.2f} " + (
        f"kept_fraction {result['sparsity']['kept_fraction']:.4f}" if result["sparsity"] else ""))
    accelerator.wait_for_everyone()
    return result


def _maybe_checkpoint(cfg, folder, method, state, cadence, epoch_s: float, log, guard) -> None:
    """At a step boundary: a step checkpoint when it is due or a stop was requested (all ranks
    agree on the step); after a stop request, raise Interrupted once it is saved."""
    action = cadence.poll(lost=folder.lease_lost())
    if not action:
        return
    folder.check_lease(lost=action == 3)
    state["nonfinite_steps"] = guard.check(state["epoch"])  # never checkpoint a diverged state
    saved = {**state, "epoch_time_s": state["epoch_time_s"] + epoch_s}
    folder.save(identity.CHECKPOINT, _checkpoint(cfg, method, saved))
    cadence.saved()
    if action == 2:
        log.line(f"stop requested ({runfolder.stop_reason() or 'by another rank'}): checkpoint saved at "
                 f"epoch {state['epoch'] + 1}, step {state['step_in_epoch']} of the epoch")
        if dist.is_initialized():
            dist.barrier()
        raise runfolder.Interrupted(state["step"])


# -- sources ----------------------------------------------------------------------------------

def resolve(cfg: Config) -> Config:
    """Fill in what a hand-made config leaves to the source: a finetune run from --source-net
    is labelled with the method that made its mask (read from a bip checkpoint). Grids set
    prune.method themselves."""
    source = identity.source_file(cfg.run.source_net) if cfg.run.source_net else None
    if cfg.run.stage == "finetune" and source is not None and source.is_file():
        meta = checkpoint.source_state(source)[1]
        if meta.get("method") and meta["method"] != "dense":
            return cfg.replace(**{"prune.method": meta["method"]})
    return cfg


def source_path(cfg: Config, root: Path) -> Path | None:
    """The model file a prune / finetune starts from: --source-net (a file, or a finished run's
    folder) or the parent run's published final.pt, never a checkpoint still being written."""
    if cfg.run.source_net:
        if cfg.run.stage == "pretrain":
            raise BipError("pretrain starts from scratch; --source-net is for prune and finetune")
        path = Path(cfg.run.source_net)
        if path.is_dir():
            return _published(path, f"--source-net {path}")
        if not path.is_file():
            raise BipError(f"--source-net file not found: {path}")
        return path
    parent = identity.parent_dir(cfg, root)
    if parent is None:
        return None
    return _published(parent, f"parent run {cfg.run.parent} (seed {cfg.run.seed})")


def parent_result(source: Path | None) -> dict | None:
    """The published result.json next to the source model (a parent run's folder), or None for
    a source that is not a finished bip run (a plain weights file)."""
    if source is None:
        return None
    try:
        doc = json.loads((source.parent / identity.RESULT).read_bytes())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("status") == "done" else None


def _published(run_dir: Path, what: str) -> Path:
    found = runfolder.inspect(run_dir)
    if found.state != "done":
        raise BipError(f"{what} has not finished ({found.state}"
                       + (f": {found.detail}" if found.detail else "") + f"; no published {identity.FINAL})")
    return runfolder.model_file(run_dir, found.result)


def load_source(cfg: Config, model: torch.nn.Module, path: Path) -> None:
    """Load the source weights (and, for finetune, its mask) into ``model``."""
    state, meta = checkpoint.source_state(path)
    state = {k.replace("popup_scores", "scores"): v for k, v in state.items()}  # released code
    if cfg.run.stage == "finetune":
        if meta and (meta.get("layer_type") != cfg.prune.layer_type or
                     not math.isclose(meta.get("k", -1.0), cfg.prune.k, rel_tol=1e-9)):
            raise BipError(f"finetune must keep the source's mask: {path} was pruned with "
                           f"layer_type={meta.get('layer_type')} k={meta.get('k')}, this run has "
                           f"layer_type={cfg.prune.layer_type} k={cfg.prune.k}")
        if not any(k.endswith("scores") or k.endswith("mask") for k in state):
            raise BipError(f"finetune needs a pruned source; {path} holds a dense model")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise BipError(f"{path} does not fit {cfg.model.arch}: {str(err).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not (k.endswith("scores") or k.endswith("mask"))]
    unexpected = [k for k in unexpected if not (k.endswith("scores") or k.endswith("mask"))]
    if missing or unexpected:
        raise BipError(f"{path} does not fit {cfg.model.arch}: missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}")
    if cfg.run.stage == "finetune" and not any(k.endswith("mask") for k in state):
        masking.refresh_masks(model, cfg.prune.k)  # a released-code checkpoint: scores only


def model_input(cfg: Config, spec):
    """tv:/timm: models see images normalised with their pretrained mean/std (when
    data.normalize) and, for ImageNet-style data without data.image_size, cropped at their
    input size; small datasets keep their size and the model resizes on the device."""
    if not is_external(cfg.model.arch):
        return spec
    native = input_defaults(cfg.model.arch)
    changes = {"mean": native.mean, "std": native.std} if native.mean else {}
    if spec.style == "imagenet" and not cfg.data.image_size:
        changes["image_size"] = cfg.model.input_size or native.size
    return dataclasses.replace(spec, **changes)


def rewind_epoch(cfg: Config) -> int:
    """The pretrain epoch saved for IMP's rewinding (default: 5% of training, at least 1)."""
    if cfg.train.rewind_epoch >= 0:
        return cfg.train.rewind_epoch
    return max(1, round(0.05 * cfg.train.epochs))


# -- evaluation, checkpoints, results ----------------------------------------------------------

@torch.no_grad()
def _evaluate(model, loaders, accelerator, cfg: Config) -> dict:
    _sync_batchnorm_stats(model)
    model.eval()
    out = {}
    for name, batches in (("val", loaders.val), ("test", loaders.test)):
        if batches is None:
            continue
        # Correct, top-5 correct, loss summed on the device in float64 (no per-batch host copy);
        # the sample count is known on the host and joins the sums once, before the all-reduce.
        sums, n = torch.zeros(4, dtype=torch.float64, device=accelerator.device), 0
        for x, y in batches():
            with autocast(cfg, accelerator.device.type):
                logits = model(x)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = torch.stack([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(1).sum()])
            sums[:2] += hits
            sums[2] += F.cross_entropy(logits.double(), y, reduction="sum")
            n += len(y)
        sums[3] += n
        if dist.is_initialized():
            dist.all_reduce(sums)
        correct, correct5, loss, n = sums.tolist()
        out.update({f"{name}_acc": 100 * correct / n, f"{name}_top5": 100 * correct5 / n,
                    f"{name}_loss": loss / n})
    model.train()
    return out


def _sync_batchnorm_stats(model) -> None:
    """Average BN running statistics over ranks (DDP runs with broadcast_buffers=False so
    the masks, also buffers, are not re-sent every forward)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf)
                buf /= dist.get_world_size()


def _checkpoint(cfg: Config, method, state: dict) -> dict:
    """Everything an exact resume at this step boundary needs (weights_only-loadable)."""
    return {"format": checkpoint.FORMAT, "model": method.core.state_dict(),
            "method": method.state_dict(), "rng": checkpoint.rng_state(),
            "epoch": state["epoch"], "step": state["step"], "step_in_epoch": state["step_in_epoch"],
            "totals": world.reduce_totals(state["totals"]), "epoch_time_s": state["epoch_time_s"],
            "best": state["best"], "wall_time_s": state["wall_time_s"],
            "nonfinite_steps": state["nonfinite_steps"], "compute": dict(state["compute"]),
            "meta": _meta(cfg, method.num_classes)}


def _final(cfg: Config, method) -> dict:
    """final.pt: the trained model (weights, scores, masks, BN statistics) and what made it."""
    return {"format": checkpoint.FINAL_FORMAT, "model": method.core.state_dict(),
            "meta": _meta(cfg, method.num_classes)}


def _meta(cfg: Config, num_classes: int) -> dict:
    return {"stage": cfg.run.stage, "method": _method_label(cfg),
            "layer_type": cfg.prune.layer_type, "k": cfg.prune.k, "arch": cfg.model.arch,
            "dataset": cfg.data.dataset, "run_id": identity.run_id(cfg), "seed": cfg.run.seed,
            "num_classes": num_classes, "n": cfg.prune.n, "m": cfg.prune.m,  # n, m: N:M masks
            "world_size": cfg.train.world_size,
            "model_options": model_options(cfg.model)}


def _method_label(cfg: Config) -> str:
    """dense for pretrain; otherwise the prune method that made (or will make) the mask."""
    return "dense" if cfg.run.stage == "pretrain" else cfg.prune.method


def _seed_checkpoint(cfg: Config) -> dict:
    """The --resume checkpoint, checked before anything is written: it must be a bip
    checkpoint of THIS run (same run id and seed) unless run.resume_foreign=true."""
    path = Path(cfg.run.resume)
    ckpt = checkpoint.load(path, "resume checkpoint")
    if ckpt.get("format") != checkpoint.FORMAT or not isinstance(ckpt.get("meta"), dict):
        raise BipError(f"{path} is not a bip checkpoint (cannot resume from it)")
    _check_complete(ckpt, path)  # what is missing says more than whose it is
    meta = ckpt["meta"]
    mine = (identity.run_id(cfg), cfg.run.seed)
    if (meta.get("run_id"), meta.get("seed")) != mine and not cfg.run.resume_foreign:
        raise BipError(f"--resume {path} is a checkpoint of run {meta.get('run_id')} seed "
                       f"{meta.get('seed')}, not of this run ({mine[0]} seed {mine[1]}); "
                       "run.resume_foreign=true resumes it anyway")
    world.check_checkpoint(meta, cfg, path)
    return ckpt


def _check_complete(ckpt: dict, path: Path) -> None:
    lacking = [k for k in ("model", "method", "rng", "epoch", "step", "best", "wall_time_s") if k not in ckpt]
    if lacking:
        raise BipError(f"{path} cannot be resumed from: it lacks {', '.join(lacking)}")


def _resume(ckpt: dict, path: Path, method) -> dict:
    if ckpt.get("format") != checkpoint.FORMAT:
        raise BipError(f"{path} is not a bip checkpoint (cannot resume from it)")
    _check_complete(ckpt, path)
    try:
        method.core.load_state_dict(ckpt["model"])
        method.load_state_dict(ckpt["method"])
        state = {k: ckpt[k] for k in ("epoch", "step", "best", "wall_time_s")}
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise BipError(f"{path} does not match this run's model/method ({type(err).__name__})") from None
    try:
        checkpoint.set_rng_state(ckpt["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise BipError(f"{path} holds an unusable RNG state ({type(err).__name__})") from None
    # Mid-epoch fields (checkpoints of epoch ends from before step checkpoints lack them).
    state.update(step_in_epoch=ckpt.get("step_in_epoch", 0), totals=dict(ckpt.get("totals", {})),
                 epoch_time_s=ckpt.get("epoch_time_s", 0.0), nonfinite_steps=int(ckpt.get("nonfinite_steps", 0)),
                 compute={**compute.new(), **ckpt.get("compute", {})})
    return state


def _result(cfg, method, model, positions, state, last, accelerator, elapsed, parent: dict | None) -> dict:
    best = state["best"]
    wall = round(state["wall_time_s"] if state["epoch"] else elapsed, 3)
    report = masking.sparsity_report(model) if masking.masked_layers(model) else None
    device = torch.cuda.get_device_name() if accelerator.device.type == "cuda" else "cpu"
    return {
        "status": "done", "run_id": identity.run_id(cfg), "parent_id": cfg.run.parent,
        "stage": cfg.run.stage, "method": _method_label(cfg),
        "dataset": cfg.data.dataset, "arch": cfg.model.arch, "layer_type": cfg.prune.layer_type,
        "k": cfg.prune.k, "seed": cfg.run.seed, "epochs": state["epoch"],
        "test_acc": last["test_acc"], "test_top5": last["test_top5"], "val_acc": last.get("val_acc"),
        "best_val_acc": best["val_acc"] if best["epoch"] else None, "best_epoch": best["epoch"] or None,
        "test_acc_at_best_val": best["test_acc"],
        "sparsity": {k: v for k, v in report.items() if k != "layers"} if report else None,
        "collapsed": last.get("collapsed"), "collapsed_layers": last.get("collapsed_layers"),
        **macs_from_positions(model, positions),
        "wall_time_s": wall,
        "device": device, "world_size": accelerator.num_processes,
        "global_batch_size": identity.global_batch_size(cfg),
        "nonfinite_steps": state["nonfinite_steps"],  # skipped (train.max_nonfinite_steps)
        "imp_round": getattr(method, "round", None),  # bip/imp.py: 1, 2, ... along the lineage
        **compute.result_fields(state["compute"], wall, parent),
    }


def _mask_file(cfg: Config, model, sparsity: dict) -> dict:
    report = masking.sparsity_report(model)
    return {"layer_type": cfg.prune.layer_type, "k": cfg.prune.k,
            "masks": {name: m.mask.bool().cpu().contiguous()  # NCHW whatever the training layout
                      for name, m in masking.masked_layers(model)},
            "report": {**sparsity, "layers": report["layers"]}}


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def _mean(totals: dict, key: str) -> float | None:
    if not totals.get("n"):
        return None
    value = float(totals[key]) / float(totals["n"])
    return round(100 * value if key == "correct" else value, 4)


def _summary(row: dict) -> str:
    keys = ("train_loss", "train_acc", "val_acc", "test_acc", "time_s")
    return " ".join(f"{k} {row[k]:.4g}" for k in keys if row.get(k) is not None)


class _Progress:
    """tqdm on rank 0 when attached to a terminal; plain epoch lines otherwise."""

    def __init__(self, main: bool, every: int):
        self.main, self.every = main, max(1, every)
        self.bar = main and sys.stderr.isatty()

    def wrap(self, iterable, total: int, desc: str):
        if not self.bar:
            return iterable
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False, miniters=self.every)

    def line(self, text: str) -> None:
        if self.main:
            print(text, file=sys.stderr, flush=True)


def _accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    # Masks are buffers too: do not re-send every buffer at every forward (BN statistics are
    # averaged before each evaluation instead; the masks are identical on every rank). accelerate
    # only knows the flag's old name, which newer torch reports as deprecated.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers. is deprecated", category=FutureWarning)
    # Device placement and DDP only: mixed precision is per run (bip.methods.autocast), since
    # accelerate fixes one precision per process and a second run with another one would fail.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no",
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


def check_names(cfg: Config) -> None:
    """Registry names and the result folder, before anything is written: a typo in --arch,
    --dataset or --result-dir creates no folder (bip.names checked the charset already)."""
    model_builder(cfg.model.arch)
    check_dataset(cfg.data.dataset)
    check_root("run.result_dir", cfg.run.result_dir)


def stop_on_signals(*signums: int) -> dict:
    """Turn these signals into a stop request: checkpoint at the next step boundary, then stop.
    Returns the previous handlers."""
    def handler(num, _frame):
        runfolder.request_stop(signal.Signals(num).name)
    return {signum: signal.signal(signum, handler) for signum in signums}


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (scancel, Slurm preemption, kill) and USR2 (sbatch --signal): save, then exit.
    previous = stop_on_signals(signal.SIGTERM, signal.SIGUSR2)
    try:
        return _main(argv)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _main(argv: list[str] | None) -> int:
    try:
        cfg = config_from_argv(argv)
        check_names(cfg)
        cfg = resolve(cfg)
        run_dir = identity.run_dir(cfg)
        result = train(cfg, run_dir)
    except BipError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except runfolder.Interrupted:
        print(f"stopped ({runfolder.stop_reason()}); the same command resumes {run_dir}", file=sys.stderr)
        return 128 + getattr(signal, runfolder.stop_reason() or "SIGTERM", signal.SIGTERM)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"test_acc {result['test_acc']:.2f}", file=sys.stderr)
        print(run_dir, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
