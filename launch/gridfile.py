"""The grid file format (configs/grids/*.yml): its keys, stages and axes, validated.

A grid is a mapping::

    name: cifar10_unstructured      # optional (default: file stem); names the manifest
    profile: example-cluster        # slurm/profiles/<name>.yaml, or a path (--profile overrides)
    root: runs                      # optional run root (--root overrides)
    set: {data.dataset: CIFAR10}    # every stage (prune.* / bip.* skip pretrain)
    resources: {time_min: 120}      # profile keys overridden for every stage
    stages:                         # pretrain and/or prune, optional finetune (needs prune)
      pretrain: {configs: [configs/{dataset}/pretrain.yml], set: {...}, resources: {...}}
      # or, to start every prune run from a published state dict or a finished run's folder
      # instead (no pretrain job; the prune runs get run.source_net=PATH):   pretrain: {source: PATH}
      prune:    {configs: ["configs/{dataset}/{method}.yml"]}
      finetune: {configs: [configs/{dataset}/finetune.yml], methods: [hydra]}
      export:   {thin: true, latency: [1, 64], onnx: false}   # optional: see EXPORT_KEYS
    axes: {arch: [resnet18], k: [0.5, 0.1], method: [bip, hydra], seed: [1, 2]}   # product
    zip:  {optim.lr: [0.1, 0.01], bip.gamma: [1, 10]}     # advanced together, x the product

Axis keys are dataset, arch, layer_type, k, seed, method, a seed-README flat key (lr, epochs,
...) or any ``section.key``. Scope: data.dataset, model.* and run.seed reach every stage (a
child trains the same model on the same data); prune.* reaches prune and finetune; any other
key reaches only the swept stage (prune, or pretrain in a pretrain-only grid) so that sweeping
a prune knob never splits the shared pretrain; ``key@stage[,stage]`` names the stages itself.

``stages.export`` is not a training stage: the last run of each cell (its finetune, else its
prune) exports itself at the end of its own job (``python -m bip.export`` with these options;
``thin`` only where the cell is filter / channel pruned), so a structured sweep ends with
thinned models and their latency in the index.
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Any

from bip.config import METHODS, valid_keys
from bip.config.schema import FLAT_KEYS
from bip.errors import BipError
from bip.export import options as export_options

STAGES = ("pretrain", "prune", "finetune")
SHORT = {"dataset": "data.dataset", "arch": "model.arch", "layer_type": "prune.layer_type",
         "k": "prune.k", "seed": "run.seed", "method": "prune.method"}
# What the launcher sets itself, and where a grid says it instead.
_OWNED = {"exp_mode": "stages", "run.stage": "stages", "run.parent": "stages",
          "result_dir": "root: or --root", "run.result_dir": "root: or --root"}
# Flat seed keys whose value is translated (trainer: bilevel -> prune.method=bip): fine in
# `set`, but an axis must use the field itself, so labels and placeholders show real values.
_TRANSLATED = {"trainer": "prune.method", "scaled_score_init": "prune.score_init",
               "freeze_bn": "prune.train_bn"}
# A child trains the same model on the same data with the same seed as its parent.
LINEAGE = ("data.dataset", "model.arch", "model.num_classes", "run.seed")
GRID_KEYS = ("name", "profile", "root", "set", "resources", "stages", "axes", "zip")
# stages.export: option -> default, the arguments of bip.export.export_run.
EXPORT_KEYS = export_options.GRID_DEFAULTS
STAGE_KEYS = {"pretrain": ("configs", "set", "resources", "source"),
              "prune": ("configs", "set", "resources"),
              "finetune": ("configs", "set", "resources", "methods")}


@dataclass(frozen=True)
class Axis:
    name: str                # as written in the grid
    dotted: str
    stages: tuple[str, ...]
    values: tuple


def label(cell: tuple, stage: str | None = None) -> str:
    """The cell's axis values (those that reach ``stage``, when given)."""
    return " ".join(f"{axis.name}={value}" for axis, value in cell
                    if stage is None or stage in axis.stages) or "-"


def check_keys(doc: Any, allowed: tuple, where: str) -> None:
    if not isinstance(doc, dict):
        raise BipError(f"{where}: expected a mapping, got {type(doc).__name__}")
    for key in doc:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise BipError(f"{where}: unknown key {key!r}{hint}; valid: {', '.join(allowed)}")


def mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BipError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def stages_of(value: Any, where: str) -> dict[str, dict]:
    stages = {k: v for k, v in mapping(value, f"{where}: stages").items() if k != "export"}
    check_keys(stages, STAGES + ("export",), f"{where}: stages")
    if not stages:
        raise BipError(f"{where}: no stages; give pretrain and/or prune (and optionally finetune)")
    if "finetune" in stages and "prune" not in stages:
        raise BipError(f"{where}: a finetune stage needs a prune stage")
    out = {}
    for stage in STAGES:
        if stage in stages:
            spec = mapping(stages[stage], f"{where}: stages.{stage}")
            check_keys(spec, STAGE_KEYS[stage], f"{where}: stages.{stage}")
            configs = spec.get("configs") or []
            if not isinstance(configs, list) or not all(isinstance(c, str) for c in configs):
                raise BipError(f"{where}: stages.{stage}.configs must be a list of paths")
            # IMP rounds already retrain (each round trains its masked weights from the rewind
            # point): no finetune unless a grid names imp here.
            methods = spec.get("methods", [m for m in METHODS if m != "imp"])
            if not isinstance(methods, list) or not set(methods) <= set(METHODS):
                raise BipError(f"{where}: stages.finetune.methods must list some of: {', '.join(METHODS)}")
            out[stage] = {**spec, "configs": configs, "methods": methods}
    source = out.get("pretrain", {}).get("source")
    if source is not None:
        if not isinstance(source, str) or not source or set(out["pretrain"]) & {"set", "resources"} \
                or out["pretrain"]["configs"]:
            raise BipError(f"{where}: stages.pretrain.source is the path of a state dict file or of a "
                           "finished run folder, given alone (no configs, set or resources: no pretrain "
                           "job runs)")
        if "prune" not in out:
            raise BipError(f"{where}: stages.pretrain.source needs a prune stage")
    return out


def export_of(value: Any, where: str) -> dict | None:
    """The validated ``stages.export`` options with defaults filled in, or None. The options
    are checked by bip.export.options, as ``python -m bip.export`` checks its flags."""
    stages = mapping(value, f"{where}: stages")
    if "export" not in stages:
        return None
    spec = mapping(stages["export"], f"{where}: stages.export")
    check_keys(spec, tuple(EXPORT_KEYS), f"{where}: stages.export")
    if "prune" not in stages:  # a pretrain is dense: nothing to thin or to measure against
        raise BipError(f"{where}: stages.export needs a prune stage (it exports each cell's pruned model)")
    out = {**EXPORT_KEYS, **spec}
    export_options.check_options(out, lambda key: f"stages.export.{key}", f"{where}: ")
    return out


def dotted_key(key: str, where: str, axis: bool = False) -> str:
    """An axis / set key -> its ``section.key``; raises on unknown or launcher-owned keys."""
    if key in _OWNED:
        raise BipError(f"{where}: {key!r} is set by the launcher; use {_OWNED[key]}")
    if key in _TRANSLATED:
        if axis:
            raise BipError(f"{where}: an axis cannot use {key!r}; use {_TRANSLATED[key]}")
        return _TRANSLATED[key]
    dotted = SHORT.get(key) or FLAT_KEYS.get(key) or key
    if dotted not in _dotted_keys():
        choices = list(SHORT) + sorted(_dotted_keys())
        close = difflib.get_close_matches(key, choices, n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise BipError(f"{where}: unknown key {key!r}{hint}; use dataset, arch, layer_type, k, "
                       "seed, method or section.key")
    return dotted


@functools.lru_cache(maxsize=1)
def _dotted_keys() -> frozenset:
    return frozenset(k for k in valid_keys() if "." in k)


def _scope(dotted: str, stages: dict, explicit: str | None, where: str) -> tuple[str, ...]:
    if explicit is not None:
        named = tuple(s.strip() for s in explicit.split(","))
        for stage in named:
            if stage not in stages:
                raise BipError(f"{where}: @{stage} is not a stage of this grid ({', '.join(stages)})")
        return named
    swept = "prune" if "prune" in stages else "pretrain"
    if dotted in LINEAGE or dotted.startswith("model."):
        return tuple(stages)
    if dotted.startswith("prune."):
        if swept == "pretrain":
            raise BipError(f"{where}: a pretrain-only grid cannot sweep {dotted} (pretrain is dense)")
        return tuple(s for s in ("prune", "finetune") if s in stages)
    return (swept,)


def axes_of(doc: dict, stages: dict, where: str) -> tuple[list[Axis], list[list[tuple]]]:
    """The axes, and the groups whose product gives the cells (one group per product axis,
    one for all zip axes together); each group lists tuples of (axis, value) pairs."""
    axes, groups, seen = [], [], {}
    for section in ("axes", "zip"):
        spec = mapping(doc.get(section), f"{where}: {section}")
        zipped = []
        for name, values in spec.items():
            name = str(name)
            key, _, explicit = name.partition("@")
            at = f"{where}: {section}.{name}"
            dotted = dotted_key(key, at, axis=True)
            axis_stages = _scope(dotted, stages, explicit or None, at)
            if not isinstance(values, list) or not values:
                raise BipError(f"{at}: an axis needs a non-empty list of values")
            if any(isinstance(v, (dict, list)) for v in values):
                raise BipError(f"{at}: axis values must be scalars")
            for stage in axis_stages:
                if (dotted, stage) in seen:
                    raise BipError(f"{at}: {dotted} is already an axis ({seen[dotted, stage]}) for {stage}")
                seen[dotted, stage] = name
            axis = Axis(name, dotted, axis_stages, tuple(values))
            axes.append(axis)
            if section == "axes":
                groups.append([((axis, v),) for v in values])
            else:
                zipped.append(axis)
        if zipped:
            lengths = {len(a.values) for a in zipped}
            if len(lengths) > 1:
                raise BipError(f"{where}: zip lists must have the same length, got "
                               + ", ".join(f"{a.name}: {len(a.values)}" for a in zipped))
            groups.append([tuple((a, a.values[i]) for a in zipped) for i in range(lengths.pop())])
    if not axes:
        groups.append([()])  # a grid without axes is one cell
    return axes, groups
