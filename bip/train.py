"""The one training loop: build -> resume -> epochs -> eval -> checkpoint -> result.json.

``python -m bip.train`` takes the original BiP README's flags (``--configs --exp-mode --k
...``) plus ``section.key=value``; the last line it prints is the run folder. ``train(cfg,
run_dir)`` is the library entry point the launcher calls. A run writes only its own folder;
``result.json`` is written last, and its presence means the run is done: calling train again
returns it without training. A run with a ``checkpoint.pt`` resumes from it exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bip import checkpoint, collapse, identity, masking
from bip.config import Config, config_from_argv
from bip.data import check_dataset, describe_dataset, load_dataset
from bip.data.loaders import build_loaders
from bip.errors import BipError
from bip.export import count_params_and_macs
from bip.methods import autocast, create_method
from bip.models import create_model, model_builder, model_options
from bip.models.external import input_defaults, is_external
from bip.names import check_root
from bip.nonfinite import NonFiniteGuard
from bip.provenance import provenance, seed_everything
from bip.speed import prepare_model

Hook = Callable[[str, dict], None]


def train(cfg: Config, run_dir: str | Path | None = None, hook: Hook | None = None) -> dict:
    """Run (or resume, or return the finished result of) one stage; returns result.json."""
    run_dir = Path(run_dir) if run_dir is not None else identity.run_dir(cfg)
    if (run_dir / identity.RESULT).is_file():
        return json.loads((run_dir / identity.RESULT).read_text())
    accelerator = _accelerator(cfg)
    main_process = accelerator.is_main_process
    try:
        return _train(cfg, run_dir, accelerator, hook)
    except Exception as err:
        if main_process:  # the folder says why it failed; Slurm sees the exception
            checkpoint.write_json(run_dir / identity.ERROR, {
                "status": "failed", "error": f"{type(err).__name__}: {err}", "time": time.time()})
        raise


def _train(cfg: Config, run_dir: Path, accelerator, hook: Hook | None) -> dict:
    start_time, main = time.time(), accelerator.is_main_process
    seed_everything(cfg.run.seed, cfg.train.deterministic)
    # Cheap checks first: a typo should not wait for the dataset to load.
    model_builder(cfg.model.arch)
    source = source_path(cfg, Path(cfg.run.result_dir))
    resume_path = Path(cfg.run.resume) if cfg.run.resume else run_dir / identity.CHECKPOINT
    resuming = resume_path.is_file() or bool(cfg.run.resume)
    # ffcv brings its own images: only the dataset's description is needed (no raw files).
    spec = (describe_dataset if cfg.data.loader == "ffcv" else load_dataset)(cfg.data, cfg.model.num_classes)
    spec = model_input(cfg, spec)
    # On the device, in its memory format and compiled (bip.speed) before any aliasing
    # (reference BiP) or optimizer references are made.
    model = prepare_model(create_model(cfg.model.arch, spec.num_classes, cfg.prune.layer_type,
                                       **model_options(cfg.model)).to(accelerator.device), cfg.train)
    if source is not None:
        load_source(cfg, model, source)
    elif cfg.run.stage != "pretrain" and not resuming:
        raise BipError(f"stage {cfg.run.stage} needs a source: --source-net CKPT or run.parent=RUN_ID")
    rewind = None
    if cfg.run.stage == "prune" and cfg.prune.method == "imp":
        rewind = checkpoint.source_state(_rewind_path(cfg, source))[0]
    method = create_method(cfg, model, rewind)
    loaders = build_loaders(cfg.data, spec, seed=cfg.run.seed, streams=method.streams,
                            rank=accelerator.process_index, world=accelerator.num_processes,
                            device=accelerator.device)
    method.attach(accelerator.prepare_model(model) if accelerator.num_processes > 1 else model,
                  accelerator)

    state = {"epoch": 0, "step": 0, "best": {"val_acc": -1.0, "epoch": 0, "test_acc": None},
             "wall_time_s": 0.0, "nonfinite_steps": 0}
    if resuming:
        state = _resume(resume_path, method, state)
    guard = NonFiniteGuard(method.core, method.optimizers.values(), cfg.train.max_nonfinite_steps,
                           accelerator.device, state["nonfinite_steps"])
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text(run_dir / identity.CONFIG, identity.config_yaml(cfg, provenance(accelerator)))
        (run_dir / identity.ERROR).unlink(missing_ok=True)
        _trim_metrics(run_dir / identity.METRICS, state["epoch"])

    epochs, steps = method.epochs(), len(loaders.streams[0])
    if cfg.train.steps_per_epoch:
        steps = min(steps, cfg.train.steps_per_epoch)
    log = _Progress(main, cfg.run.print_freq)
    last = None
    for epoch in range(state["epoch"], epochs):
        t0 = time.time()
        method.on_epoch_start(epoch)
        model.train()
        totals = {}
        batches = zip(*(stream.epoch(epoch) for stream in loaders.streams))
        for i, batch in enumerate(log.wrap(batches, steps, f"epoch {epoch + 1}/{epochs}")):
            if i >= steps:
                break
            guard.before_step()
            stats = method.step(list(batch), epoch + i / steps)
            guard.after_step(stats["loss"], state["step"])
            totals = {k: totals.get(k, 0) + v for k, v in stats.items()}
            state["step"] += 1
            if state["step"] % cfg.run.print_freq == 0:  # a logging point: the one sync allowed
                guard.check(epoch)
            if hook:
                hook("step", {"epoch": epoch, "step": state["step"], "model": model})
        state["nonfinite_steps"] = guard.check(epoch)  # before anything of this epoch is saved
        last = _evaluate(model, loaders, accelerator, cfg)
        last.update(epoch=epoch + 1, step=state["step"], time_s=round(time.time() - t0, 3),
                    train_loss=_mean(totals, "loss"), train_acc=_mean(totals, "correct"))
        last.update(collapse.record(method.core, loaders.input_shape, f"epoch {epoch + 1}", log.line))
        if last.get("val_acc", -1.0) > state["best"]["val_acc"]:
            state["best"] = {"val_acc": last["val_acc"], "epoch": epoch + 1, "test_acc": last["test_acc"]}
        state["epoch"] = epoch + 1
        state["wall_time_s"] += time.time() - t0
        if main:
            _append_metrics(run_dir / identity.METRICS, last)
            checkpoint.save(run_dir / identity.CHECKPOINT, _checkpoint(cfg, method, state))
            if cfg.run.stage == "pretrain" and epoch + 1 == rewind_epoch(cfg):
                checkpoint.save(run_dir / identity.REWIND, _checkpoint(cfg, method, state))
            log.line(f"epoch {epoch + 1}/{epochs} " + _summary(last))
        collapse.enforce(last, cfg.prune.on_collapse, f"epoch {epoch + 1}")
        if hook:
            hook("epoch", {"epoch": epoch + 1, "metrics": last, "model": model})
    if last is None:  # nothing trained (one-shot methods, or epochs=0): evaluate once
        last = _evaluate(model, loaders, accelerator, cfg)
        last.update(collapse.record(method.core, loaders.input_shape, "mask", log.line))
        collapse.enforce(last, cfg.prune.on_collapse, "mask")
        if main:
            checkpoint.save(run_dir / identity.CHECKPOINT, _checkpoint(cfg, method, state))
    result = _result(cfg, model, loaders, state, last, accelerator, time.time() - start_time)
    if main:
        if masking.masked_layers(model):
            checkpoint.save(run_dir / identity.MASK, _mask_file(cfg, model, result["sparsity"]))
        checkpoint.write_json(run_dir / identity.RESULT, result)
        log.line(f"done: test_acc {result['test_acc']:.2f} " + (
            f"kept_fraction {result['sparsity']['kept_fraction']:.4f}" if result["sparsity"] else ""))
    accelerator.wait_for_everyone()
    return result


# -- sources ----------------------------------------------------------------------------------

def resolve(cfg: Config) -> Config:
    """Fill in what a hand-made config leaves to the source: a finetune run from --source-net
    is labelled with the method that made its mask (read from a bip checkpoint). Grids set
    prune.method themselves."""
    if cfg.run.stage == "finetune" and cfg.run.source_net and Path(cfg.run.source_net).is_file():
        meta = checkpoint.source_state(cfg.run.source_net)[1]
        if meta.get("method") and meta["method"] != "dense":
            return cfg.replace(**{"prune.method": meta["method"]})
    return cfg


def source_path(cfg: Config, root: Path) -> Path | None:
    if cfg.run.source_net:
        if cfg.run.stage == "pretrain":
            raise BipError("pretrain starts from scratch; --source-net is for prune and finetune")
        path = Path(cfg.run.source_net)
        if not path.is_file():
            raise BipError(f"--source-net file not found: {path}")
        return path
    parent = identity.parent_dir(cfg, root)
    if parent is None:
        return None
    if not (parent / identity.RESULT).is_file():
        raise BipError(f"parent run {cfg.run.parent} (seed {cfg.run.seed}) has not finished: "
                       f"no {parent / identity.RESULT}")
    return parent / identity.CHECKPOINT


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


def _rewind_path(cfg: Config, source: Path | None) -> Path:
    if source is None:
        raise BipError("imp needs a source run (its rewind.pt holds the early weights)")
    path = source.with_name(identity.REWIND)
    if not path.is_file():
        raise BipError(f"imp rewinds to the source run's early weights, but {path} does not exist "
                       "(pretrain writes it at train.rewind_epoch)")
    return path


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
        sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
        for x, y in batches():
            with autocast(cfg, accelerator.device.type):
                logits = model(x)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            sums += torch.stack([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(1).sum(),
                                 F.cross_entropy(logits.float(), y, reduction="sum"),
                                 torch.tensor(len(y), device=y.device)]).double()
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
    return {"format": checkpoint.FORMAT, "model": method.core.state_dict(),
            "method": method.state_dict(), "rng": checkpoint.rng_state(),
            "epoch": state["epoch"], "step": state["step"], "best": state["best"],
            "wall_time_s": state["wall_time_s"], "nonfinite_steps": state["nonfinite_steps"],
            "meta": _meta(cfg, method.num_classes)}


def _meta(cfg: Config, num_classes: int) -> dict:
    return {"stage": cfg.run.stage, "method": _method_label(cfg),
            "layer_type": cfg.prune.layer_type, "k": cfg.prune.k, "arch": cfg.model.arch,
            "dataset": cfg.data.dataset, "run_id": identity.run_id(cfg), "seed": cfg.run.seed,
            "num_classes": num_classes, "n": cfg.prune.n, "m": cfg.prune.m,  # n, m: N:M masks
            "model_options": model_options(cfg.model)}


def _method_label(cfg: Config) -> str:
    """dense for pretrain; otherwise the prune method that made (or will make) the mask."""
    return "dense" if cfg.run.stage == "pretrain" else cfg.prune.method


def _resume(path: Path, method, state: dict) -> dict:
    ckpt = checkpoint.load(path, "resume checkpoint")
    if ckpt.get("format") != checkpoint.FORMAT:
        raise BipError(f"{path} is not a bip checkpoint (cannot resume from it)")
    lacking = [k for k in ("model", "method", "rng", "epoch", "step", "best", "wall_time_s") if k not in ckpt]
    if lacking:
        raise BipError(f"{path} cannot be resumed from: it lacks {', '.join(lacking)}")
    try:
        method.core.load_state_dict(ckpt["model"])
        method.load_state_dict(ckpt["method"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise BipError(f"{path} does not match this run's model/method ({type(err).__name__})") from None
    try:
        checkpoint.set_rng_state(ckpt["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise BipError(f"{path} holds an unusable RNG state ({type(err).__name__})") from None
    return {**{k: ckpt[k] for k in ("epoch", "step", "best", "wall_time_s")},
            "nonfinite_steps": int(ckpt.get("nonfinite_steps", 0))}


def _result(cfg, model, loaders, state, last, accelerator, elapsed) -> dict:
    best = state["best"]
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
        **count_params_and_macs(model, loaders.input_shape),
        "wall_time_s": round(state["wall_time_s"] if state["epoch"] else elapsed, 3),
        "device": device, "world_size": accelerator.num_processes,
        "nonfinite_steps": state["nonfinite_steps"],  # skipped (train.max_nonfinite_steps)
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


def _trim_metrics(path: Path, epoch: int) -> None:
    """On resume, drop metric lines of epochs the checkpoint does not cover."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= epoch:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill
    checkpoint.write_text(path, "".join(line + "\n" for line in keep))


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


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_argv(argv)
        check_names(cfg)
        cfg = resolve(cfg)
        run_dir = identity.run_dir(cfg)
        result = train(cfg, run_dir)
    except BipError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"test_acc {result['test_acc']:.2f}", file=sys.stderr)
        print(run_dir, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
