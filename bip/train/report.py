"""What a run reports: the row of an epoch (metrics.jsonl, the tracker, the console), and the
result and mask files it publishes at the end."""
from __future__ import annotations

import sys
import time

from bip.config import Config, identity
from bip.models.accounting import macs_from_positions
from bip.pruning import collapse, masking
from bip.train import compute
from bip.train.distributed import Ranks, reduce_totals
from bip.train.evaluate import evaluate, recalibrate_bn
from bip.train.state import TrainState


def end_epoch(job, state: TrainState, ranks: Ranks, log, started: float | None = None) -> dict:
    """Evaluate and describe the model as it stands: the row of the epoch just trained, or with
    ``started=None`` of the mask of a run that trains nothing (one-shot methods, epochs=0).
    ``started`` is the time this segment of the epoch began (its time includes the evaluation).
    Reads the masks, so it syncs with the device: epoch ends only."""
    trained = started is not None
    cfg = job.cfg
    if cfg.eval.bn_recalibrate:  # the statistics of THIS mask, not an average over the epoch's masks
        seen = recalibrate_bn(job.model, job.loaders.streams[0].epoch(state.epoch), cfg.eval.bn_recalibrate, cfg)
        compute.add_step(state.compute, (seen, 0), ranks.world)
    row = evaluate(job.model, job.loaders, ranks, cfg)
    label = f"epoch {state.epoch + 1}" if trained else "mask"
    if trained:
        state.epoch_time_s += time.time() - started
        totals = reduce_totals(state.totals)  # every rank's shard
        row.update(epoch=state.epoch + 1, step=state.step, time_s=round(state.epoch_time_s, 3),
                   train_loss=_mean(totals, "loss"), train_acc=_mean(totals, "correct"))
        if "lower_loss" in totals:  # BiP: train_loss is the upper level's, this the lower's
            row["lower_loss"] = _mean(totals, "lower_loss")
        if job.method.monitor is not None:
            row.update(job.method.monitor.epoch_fields())
    row.update(collapse.record(job.method.core, job.loaders.input_shape, label, log.line))
    if trained:
        compute.close_epoch(state.compute, macs_from_positions(job.model, job.positions)["macs_effective"])
        row.update(compute.epoch_fields(state.compute))
        # Mid-ramp epochs (prune.ramp_epochs) keep more than k: they are not candidates.
        settled = state.epoch + 1 > job.method.ramp_end
        if settled and row.get("val_acc", -1.0) > state.best["val_acc"]:
            state.best = {"val_acc": row["val_acc"], "epoch": state.epoch + 1, "test_acc": row["test_acc"]}
    return row


def result(job, state: TrainState, last: dict, ranks: Ranks, elapsed: float) -> dict:
    """result.json of a finished run."""
    cfg, model, best = job.cfg, job.model, state.best
    wall = round(state.wall_time_s if state.epoch else elapsed, 3)
    report = masking.sparsity_report(model) if masking.masked_layers(model) else None
    return {
        "status": "done", "run_id": identity.run_id(cfg), "parent_id": cfg.run.parent,
        "stage": cfg.run.stage, "method": cfg.method_label,
        "dataset": cfg.data.dataset, "arch": cfg.model.arch, "layer_type": cfg.prune.layer_type,
        "k": cfg.prune.k, "seed": cfg.run.seed, "epochs": state.epoch,
        "test_acc": last["test_acc"], "test_top5": last["test_top5"], "val_acc": last.get("val_acc"),
        "best_val_acc": best["val_acc"] if best["epoch"] else None, "best_epoch": best["epoch"] or None,
        "test_acc_at_best_val": best["test_acc"],
        "sparsity": {k: v for k, v in report.items() if k != "layers"} if report else None,
        "collapsed": last.get("collapsed"), "collapsed_layers": last.get("collapsed_layers"),
        **macs_from_positions(model, job.positions),
        "wall_time_s": wall,
        "device": ranks.device_name(), "world_size": ranks.world,
        "global_batch_size": identity.global_batch_size(cfg),
        "nonfinite_steps": state.nonfinite_steps,  # skipped (train.max_nonfinite_steps)
        "imp_round": getattr(job.method, "round", None),  # bip/methods/imp.py: 1, 2, ... along the lineage
        **compute.result_fields(state.compute, wall, job.parent_result),
    }


def mask_file(cfg: Config, model, sparsity: dict) -> dict:
    report = masking.sparsity_report(model)
    return {"layer_type": cfg.prune.layer_type, "k": cfg.prune.k,
            "masks": {name: m.mask.bool().cpu().contiguous()  # NCHW whatever the training layout
                      for name, m in masking.masked_layers(model)},
            "report": {**sparsity, "layers": report["layers"]}}


def _mean(totals: dict, key: str) -> float | None:
    if not totals.get("n"):
        return None
    value = float(totals[key]) / float(totals["n"])
    return round(100 * value if key == "correct" else value, 4)


def summary(row: dict) -> str:
    keys = ("train_loss", "train_acc", "val_acc", "test_acc", "time_s")
    return " ".join(f"{k} {row[k]:.4g}" for k in keys if row.get(k) is not None)


class Progress:
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
