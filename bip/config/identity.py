"""Run identity and the run-folder layout: the one place paths are built.

A run id is ``<dataset>-<arch>-<stage>-<method>-<hash>``, the hash covering the config fields
that can change the result, and only those that differ from their defaults (so adding a field
with a no-op default keeps every old id). Paths, worker counts and labels are not hashed; the
seed is the sub-folder, so replicates are siblings:

    <root>/<run id>/seed_<seed>/{owner.json, config.yaml, metrics.jsonl, checkpoint.pt, mask.pt,
                                 final.pt, result.json, error.json, error.rank<N>.json,
                                 export.json, dense.pt, thin.pt, ...}

(bip/rundir/folder.py owns what these files mean and when they are written.)

A stage started from another run names it by id (run.parent); a hand-made source checkpoint
(run.source_net) is hashed by content.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import fields
from pathlib import Path

from bip.config import SECTIONS, Config
from bip.config.schema import SCORE_DYNAMICS
from bip.config.names import safe_component

CONFIG, METRICS, CHECKPOINT = "config.yaml", "metrics.jsonl", "checkpoint.pt"
MASK, RESULT, ERROR, REWIND = "mask.pt", "result.json", "error.json", "rewind.pt"
FINAL, OWNER = "final.pt", "owner.json"
BEST = "best.pt"  # eval.select=best_val: the best validation epoch's model and row so far
EXPORT = "export.json"  # python -m bip.export's record (result.json is never modified)


def rank_error(rank: int) -> str:
    """The error file of one rank (every rank that raises writes its own)."""
    return f"error.rank{int(rank)}.json"

# Never result-affecting.
_NOT_HASHED = {
    "data.data_dir", "data.num_workers", "data.test_batch_size", "data.train_beton",
    "data.val_beton", "run.seed", "run.exp_name", "run.result_dir", "run.resume",
    "run.print_freq", "run.diagnostics", "run.source_net", "run.resume_foreign", "run.lease_stale_min",
    "train.checkpoint_every_min",
    # A tolerance: it decides whether a diverging run stops, never what a finished run computed,
    # so raising it resumes the stopped run in its own folder.
    "train.max_nonfinite_steps",
    "prune.on_collapse",  # likewise: whether a disconnected network stops the run
    # How fast the same computation runs (bip.train.compile): round-off only, like the device.
    "train.channels_last", "train.compile", "train.compile_backend",
    "train.log_with",  # where the metrics are also sent, not what they are
}
_PAPER_ONLY = {"bip.alpha", "bip.beta", "bip.gamma", "bip.lower_wd", "bip.upper_wd", "bip.momentum"}
_REFERENCE_ONLY = {"bip.lr2", "bip.mask_lr", "bip.mask_lr_schedule"}
_UNUSED_BY_PAPER_BIP = {"optim.optimizer", "optim.lr", "optim.momentum", "optim.wd", "optim.nesterov"}
_TRAINING = {"train.epochs", "train.steps_per_epoch", "train.label_smoothing"}


def _unused(cfg: Config) -> set[str]:
    """Fields that this stage / method does not read (so they must not split ids)."""
    stage, method = cfg.run.stage, cfg.prune.method
    # train.world_size is hashed like any field: 1 (the default) leaves every 1-process id as
    # it was, N > 1 gives the run of global batch data.batch_size x N its own id. sync_bn only
    # acts under DDP.
    world = {"train.sync_bn"} if cfg.train.world_size == 1 else set()
    nm = {"prune.n", "prune.m"} if cfg.prune.layer_type != "nm" else set()  # N:M masks' group shape
    if stage == "pretrain":
        return {"prune.*", "bip.*", "eval.select"} | world
    if stage == "finetune":
        return {"bip.*", "prune.method", "prune.score_init", "prune.train_bn", "prune.imp_rate",
                "prune.variant", *SCORE_DYNAMICS} | world | nm
    unused = world | nm
    if method != "bip":
        unused.add("bip.*")
    if method != "hydra":
        unused |= {"prune.train_bn", "prune.variant"}
    if method != "imp":
        unused.add("prune.imp_rate")
    if method not in ("hydra", "bip"):
        unused |= {"prune.score_init", *SCORE_DYNAMICS}
    if method in ("omp", "random"):  # one-shot: nothing is trained
        unused |= {"optim.*", "eval.select"} | _TRAINING
    if method == "bip":
        paper = cfg.bip.variant in ("paper", "fused")  # fused reads the paper's fields
        unused |= (_REFERENCE_ONLY | _UNUSED_BY_PAPER_BIP) if paper else _PAPER_ONLY
    return unused


_DEFAULTS = Config()
_FIELDS = {section: tuple(f.name for f in fields(kind)) for section, kind in SECTIONS.items()}


def hashed_fields(cfg: Config) -> dict[str, object]:
    """The non-default, result-affecting fields of ``cfg`` as {section.key: value}."""
    unused = _unused(cfg)
    out: dict[str, object] = {}
    for section in SECTIONS:
        if f"{section}.*" in unused:
            continue
        values, defaults = getattr(cfg, section), getattr(_DEFAULTS, section)
        if values == defaults:
            continue
        for name in _FIELDS[section]:
            dotted = f"{section}.{name}"
            value = getattr(values, name)
            if value != getattr(defaults, name) and dotted not in _NOT_HASHED and dotted not in unused:
                out[dotted] = value
    if cfg.run.source_net:
        out["run.source_sha256"] = source_digest(cfg.run.source_net)
    return out


def global_batch_size(cfg: Config) -> int:
    """Training samples per optimizer step over all processes (data.batch_size is per process)."""
    return cfg.data.batch_size * cfg.train.world_size


def config_hash(cfg: Config) -> str:
    blob = json.dumps(hashed_fields(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def run_id(cfg: Config) -> str:
    dataset = safe_component(cfg.data.dataset, "data.dataset")
    arch = safe_component(cfg.model.arch, "model.arch")
    return f"{dataset}-{arch}-{cfg.run.stage}-{cfg.method_label}-{config_hash(cfg)}"


def run_dir(cfg: Config, root: str | Path | None = None) -> Path:
    return Path(root if root is not None else cfg.run.result_dir) / run_id(cfg) / f"seed_{cfg.run.seed}"


def parent_dir(cfg: Config, root: str | Path | None = None) -> Path | None:
    """The folder of the parent run (same seed), or None for runs without a parent id."""
    if not cfg.run.parent:
        return None
    return Path(root if root is not None else cfg.run.result_dir) / cfg.run.parent / f"seed_{cfg.run.seed}"


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def source_file(path: str | Path) -> Path:
    """A --source-net value as a file: a run folder means its published final.pt."""
    p = Path(path)
    return p / FINAL if p.is_dir() else p


def source_digest(path: str) -> str:
    """Content hash of a source checkpoint ('missing' if absent: train reports that error)."""
    p = source_file(path)
    if not p.is_file():
        return "missing"
    st = p.stat()
    return _digest(str(p.resolve()), st.st_size, st.st_mtime_ns)


def config_yaml(cfg: Config, provenance: dict | None = None) -> str:
    """The text of a run's config.yaml: ids, hashed fields, the full config, provenance.

    Written in JSON syntax, which is YAML too: people and yaml.safe_load read it as YAML, and
    the results index parses 10,000 of them with the json module in about a second (a YAML
    parser needs ten). A non-finite float (``bip.gamma=inf``) is written as the string "inf":
    json's ``Infinity`` is neither strict JSON nor a YAML number, and the config loader coerces
    "inf" back to the float."""
    doc = {"run_id": run_id(cfg), "parent_id": cfg.run.parent, "world_size": cfg.train.world_size,
           "global_batch_size": global_batch_size(cfg), "hashed": hashed_fields(cfg),
           "config": cfg.to_dict(), "provenance": provenance or {}}
    return json.dumps(_finite_json(doc), indent=1, allow_nan=False) + "\n"


def _finite_json(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "-inf", "nan"
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value
