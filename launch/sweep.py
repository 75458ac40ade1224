"""Grid -> validated run configs: the pretrain -> prune -> finetune DAG, shared pretrains,
duplicate cells (pure: reads the grid and its base configs, touches no run folder).

The format is launch/gridfile.py's. Config paths may hold ``{placeholders}`` (axis or ``set``
keys); relative paths are looked up in the current directory, then in the repository.
Precedence inside a stage: config files < ``set`` < stage ``set`` < axes < what the launcher
owns (run.stage, run.parent, run.result_dir, train.world_size). A finetune copies the fields
that describe its mask (MASK_FIELDS) from its prune run; a child must share its parent's
dataset, arch and seed. Each stage's train.world_size is its profile's nodes x tasks_per_node
(after the grid's resources), so a run trained by N processes has the id of its global batch
(bip.config.identity) wherever it is built.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from bip.config import identity
from bip.methods import imp_levels as imp
from bip.config import Config, build_config, read_yaml
from bip.config.load import flatten_yaml
from bip.config.schema import FLAT_KEYS
from bip.errors import BipError

# What a finetune inherits from its prune run: the method that made the mask and the mask's
# shape rules (its N:M group size is what an export reads from the finetune's own meta).
MASK_FIELDS = ("method", "layer_type", "k", "n", "m", "scope", "min_layer_keep", "skip")
from bip.config.names import check_name, check_root
from bip.export import options as export_options
from bip.rundir import folder as runfolder
from launch import profiles
from launch.gridfile import (GRID_KEYS, LINEAGE, SHORT, STAGES, axes_of, check_keys, dotted_key,
                             export_of, label, mapping, stages_of)

__all__ = ["STAGES", "GridProblems", "Plan", "Run", "load_grid", "find_file"]

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    """One run folder of the plan; ``key`` is ``<run id>/seed_<s>`` under the root."""
    stage: str
    cfg: Config
    key: str
    parent: str | None
    label: str  # the axis values of the first cell that needs this run
    export: dict | None = None  # a cell's last run: bip.export.export_run options (stages.export)


class GridProblems(BipError):
    """Every problem found in a grid's cells, one line each (grid.py prints them all)."""

    def __init__(self, problems: list[str]):
        self.problems = list(dict.fromkeys(problems))  # in order, each once
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class Plan:
    name: str
    path: Path
    root: Path
    profile: str
    resources: dict   # stage -> profile keys the grid overrides (validated by launch.profiles)
    runs: dict        # stage -> [Run] in submission order, for every stage of the grid
    cells: int
    # What is wrong with cells that could not be built (they have no runs here), a missing
    # source file, ...: load_grid(keep_going=True) returns them instead of raising.
    problems: tuple = ()

    def all_runs(self) -> list[Run]:
        return [run for stage in self.runs for run in self.runs[stage]]

    def dir(self, run: Run | str) -> Path:
        return self.root / (run if isinstance(run, str) else run.key)


def load_grid(path: str | Path, root: str | Path | None = None, profile: str | None = None,
              keep_going: bool = False) -> Plan:
    """Read, validate and expand a grid; every error is a one-line BipError. ``profile``
    (grid.py --profile) replaces the grid's own: it decides each stage's world size.

    A mistake in the grid's own structure (keys, stages, axes, resources) raises at once. The
    problems of single cells and of source files are collected: with ``keep_going`` the plan of
    the cells that could be built comes back with them in ``problems`` (a dry run shows the
    plan, then every problem); without, they raise together as GridProblems."""
    path = Path(path)
    if not path.is_file():
        raise BipError(f"grid file not found: {path}")
    doc = read_yaml(path)
    check_keys(doc, GRID_KEYS, f"{path}")
    # The name becomes <root>/_grids/<name>.json (and Slurm job names).
    name = check_name(f"{path}: grid name (set `name:`)", doc.get("name") or path.stem, prefix=False)
    where = f"grid {name}"
    stages = stages_of(doc.get("stages"), where)
    problems: list[str] = []
    source = _pretrain_source(stages, where, problems)
    axes, groups = axes_of(doc, stages, where)
    cells = [sum(combo, ()) for combo in itertools.product(*groups)]
    given = root if root is not None else doc.get("root") or "runs"
    root = check_root("--root" if root is not None else f"{where}: root", given, writable=False).resolve()
    common = mapping(doc.get("set"), f"{where}: set")
    resources = {s: {**mapping(doc.get("resources"), f"{where}: resources"),
                     **mapping(stages[s].get("resources"), f"{where}: stages.{s}.resources")}
                 for s in stages}
    profile = profile or str(doc.get("profile") or "")
    base = profiles.load_profile(profile) if profile else {}
    world = {s: profiles.world_size(profiles.resolve(base, resources[s], f"{where}: {s} resources"))
             for s in stages}
    export = export_of(doc.get("stages"), where)
    runs, leaves = _expand(name, stages, cells, common, root, where, source, world, problems)
    runs = _with_export(runs, export, leaves, where, problems)
    if problems and not keep_going:
        raise GridProblems(problems)
    return Plan(name=name, path=path, root=root, profile=profile, resources=resources, runs=runs,
                cells=len(cells), problems=tuple(dict.fromkeys(problems)))


# -- expansion -------------------------------------------------------------------------------

class _Bases:
    """Base config per (stage, resolved config paths): files < grid set < stage set."""

    def __init__(self, stages: dict, common: dict, where: str):
        self.stages, self.common, self.where = stages, common, where
        self.cache: dict = {}
        self.common_keys = {k: dotted_key(str(k), f"{where}: set") for k in common}
        for stage, spec in stages.items():
            for k in mapping(spec.get("set"), f"{where}: stages.{stage}.set"):
                dotted_key(str(k), f"{where}: stages.{stage}.set")

    def get(self, stage: str, cell: tuple) -> tuple[Config, bool]:
        """(base config, whether it names a layer type itself)."""
        paths = tuple(self._path(template, stage, cell) for template in self.stages[stage]["configs"])
        if (stage, paths) not in self.cache:
            # A stand-in layer type lets a prune / finetune base validate before the axes (or
            # the prune parent, for finetune) supply the real one.
            items = [] if stage == "pretrain" else [("prune.layer_type", "unstructured", "launcher")]
            for path in paths:
                items += flatten_yaml(read_yaml(path), str(path))
            for key, value in self.common.items():
                if stage != "pretrain" or not self.common_keys[key].startswith(("prune.", "bip.")):
                    items.append((str(key), value, f"{self.where}: set"))
            items += [(str(k), v, f"{self.where}: stages.{stage}.set")
                      for k, v in mapping(self.stages[stage].get("set"), "").items()]
            items.append(("run.stage", stage, "launcher"))  # validation depends on the stage
            named = any(SHORT.get(k, FLAT_KEYS.get(k, k)) == "prune.layer_type"
                        for k, _, origin in items if origin != "launcher")
            try:
                self.cache[stage, paths] = build_config(items), named
            except BipError as err:
                raise BipError(f"{self.where}: stage {stage} base config: {err}") from None
        return self.cache[stage, paths]

    def _path(self, template: str, stage: str, cell: tuple) -> Path:
        values = {}
        for key, value in {**self.common, **mapping(self.stages[stage].get("set"), "")}.items():
            values[str(key)] = values[dotted_key(str(key), self.where)] = value
        for axis, value in cell:
            values[axis.name] = values[axis.name.split("@")[0]] = values[axis.dotted] = value
        values.update({short: values[d] for short, d in SHORT.items() if d in values})

        def fill(match):
            if match.group(1) not in values:
                raise BipError(f"{self.where}: stages.{stage}.configs: placeholder {match.group(0)} "
                               "is not an axis or set key")
            return str(values[match.group(1)])
        return find_file(re.sub(r"\{([\w.@,]+)\}", fill, template))


def find_file(text: str) -> Path:
    path = Path(text).expanduser()
    for candidate in ([path] if path.is_absolute() else [path, REPO / path]):
        if candidate.is_file():
            return candidate.resolve()
    raise BipError(f"config file not found: {text} (looked in {Path.cwd()} and {REPO})")


def _pretrain_source(stages: dict, where: str, problems: list[str]) -> str:
    """``pretrain: {source: PATH}``: drop the pretrain stage; the prune runs start from PATH, a
    state dict file or a finished run's folder, as ``--source-net`` (bip.train.sources): checked
    now, before anything is submitted; resolved, so jobs find it from any folder. A missing or
    unfinished source is a problem of the plan, not the end of it."""
    if "source" not in stages.get("pretrain", {}):
        return ""
    path = Path(stages.pop("pretrain")["source"]).expanduser()
    if path.is_dir():
        found = runfolder.inspect(path)
        if found.state != "done":
            problems.append(f"{where}: stages.pretrain.source: run folder {path} has not finished "
                            f"({found.state}" + (f": {found.detail}" if found.detail else "")
                            + f"; no published {identity.FINAL})")
    elif not path.is_file():
        problems.append(f"{where}: stages.pretrain.source: file not found: {path}")
    return str(path.resolve())


def _expand(name: str, stages: dict, cells: list[tuple], common: dict, root: Path,
            where: str, source: str = "", world: dict | None = None,
            problems: list[str] | None = None) -> tuple[dict[str, list[Run]], set[str]]:
    """({stage: [Run]} with parents before children, {key of the last run of each cell}). A
    cell that cannot be built is left out, its error appended to ``problems`` (raised when
    None); the runs it shares with other cells stay."""
    bases = _Bases(stages, common, where)
    runs: dict[str, dict[str, Run]] = {stage: {} for stage in stages}
    leaf_owner: dict[str, str] = {}
    leaves: set[str] = set()
    imp_k_min = _imp_k_min(cells)
    launcher = {"run.result_dir": str(root)}
    built: dict[tuple, tuple[Config, str]] = {}  # a shared pretrain is built once, not per cell
    for cell in cells:
        try:
            text = label(cell)
            parent = None
            for stage in stages:
                if stage == "finetune" and parent.cfg.prune.method not in stages["finetune"]["methods"]:
                    continue
                over = {axis.dotted: value for axis, value in cell if stage in axis.stages}
                over.update(launcher, **{"run.stage": stage, "train.world_size": (world or {}).get(stage, 1)})
                if parent is not None:
                    over.update({"run.parent": parent.key.split("/")[0], "run.source_net": ""})
                elif source:
                    over["run.source_net"] = source
                if stage == "finetune":  # the mask is the prune run's: so is everything describing it
                    over.update({f"prune.{k}": getattr(parent.cfg.prune, k) for k in MASK_FIELDS})
                base, named = bases.get(stage, cell)
                if stage == "prune" and not named and "prune.layer_type" not in over:
                    raise BipError(f"{where}: the prune stage needs prune.layer_type "
                                   "(in its configs, set or axes)")
                if not base.run.exp_name:
                    over.setdefault("run.exp_name", name)  # a label only: not hashed

                def build(over: dict) -> tuple[Config, str]:
                    memo = (stage, id(base), tuple(sorted(over.items())))
                    if memo not in built:
                        try:
                            cfg = base.replace(**over)
                        except BipError as err:
                            raise BipError(f"{where}: {stage} of cell [{text}]: {err}") from None
                        built[memo] = cfg, f"{identity.run_id(cfg)}/seed_{cfg.run.seed}"
                    return built[memo]
                cfg, key = build(over)
                if stage == "prune" and cfg.prune.method == "imp":
                    # IMP levels (bip/imp.py): the rounds before this cell's one, each a child of
                    # the one before, shared by every cell of the lineage.
                    series = imp.densities(imp_k_min.get(_lineage(cell), cfg.prune.k), cfg.prune.imp_rate)
                    target = imp.round_of(cfg.prune.k, series)
                    for r in range(1, target + 1):
                        cfg, key = build({**over, "prune.k": series[r - 1]})
                        if r == target:
                            break
                        if parent is not None:
                            _check_lineage(parent, cfg, stage, text, where)
                        run = runs[stage].get(key) or Run(stage, cfg, key, parent.key if parent else None,
                                                          f"{label(cell, stage)} imp_round={r}")
                        runs[stage].setdefault(key, run)
                        parent = run
                        over = {**over, "run.parent": key.split("/")[0], "run.source_net": ""}
                if stage == "prune" and parent is None and not cfg.run.source_net:
                    raise BipError(f"{where}: a prune stage without a pretrain stage needs run.source_net")
                if parent is not None:
                    _check_lineage(parent, cfg, stage, text, where)
                shared = stage == "pretrain" and len(stages) > 1
                if not shared and key in leaf_owner:
                    raise BipError(f"{where}: duplicate cells [{leaf_owner[key]}] and [{text}] give the same "
                                   f"{stage} run {key} (fields that cannot change a result are not hashed"
                                   + ("; an IMP k is the first round with density <= k" if
                                      stage == "prune" and cfg.prune.method == "imp" else "") + ")")
                leaf_owner.setdefault(key, text)
                run = runs[stage].get(key) or Run(stage, cfg, key, parent.key if parent else None,
                                                  label(cell, stage))
                runs[stage].setdefault(key, run)
                parent = run
            leaves.add(parent.key)
        except BipError as err:
            if problems is None:
                raise
            problems.append(str(err))
    return {stage: list(by_key.values()) for stage, by_key in runs.items()}, leaves


def _lineage(cell: tuple) -> tuple:
    """What an IMP lineage shares: the cell's axis values except k."""
    return tuple((axis.dotted, value) for axis, value in cell if axis.dotted != "prune.k")


def _imp_k_min(cells: list[tuple]) -> dict[tuple, float]:
    """The smallest k asked of each lineage: its rounds reach it, larger k reuse them."""
    out: dict[tuple, float] = {}
    for cell in cells:
        for axis, value in cell:
            if axis.dotted == "prune.k" and isinstance(value, (int, float)) and not isinstance(value, bool):
                key = _lineage(cell)
                out[key] = min(out.get(key, float(value)), float(value))
    return out


def _with_export(runs: dict[str, list[Run]], export: dict | None, leaves: set[str], where: str = "",
                 problems: list[str] | None = None) -> dict[str, list[Run]]:
    """Attach the export options to the last run of every cell (an IMP round that is some
    cell's last run exports even when later rounds follow it); ``thin`` only where the cell is
    filter / channel pruned, ``nm_sparse`` only where it is N:M pruned (a grid with
    ``nm_sparse`` and no N:M cell is a problem: nothing would be exported that way)."""
    if export is None:
        return runs
    exported = [run for stage, stage_runs in runs.items() if stage != "pretrain"
                for run in stage_runs if run.key in leaves]
    if export["nm_sparse"] and exported and not any(
            run.cfg.prune.layer_type == export_options.NM_LAYER_TYPE for run in exported):
        text = (f"{where}: stages.export.nm_sparse needs N:M cells (layer_type nm); this grid's are "
                + ", ".join(sorted({run.cfg.prune.layer_type for run in exported})))
        if problems is None:
            raise BipError(text)
        problems.append(text)

    def options(run: Run) -> dict:
        layer_type = run.cfg.prune.layer_type
        return {**export, "thin": export["thin"] and layer_type in export_options.THIN_LAYER_TYPES,
                "nm_sparse": export["nm_sparse"] and layer_type == export_options.NM_LAYER_TYPE}
    return {stage: [run if run.key not in leaves or stage == "pretrain" else
                    dataclasses.replace(run, export=options(run)) for run in stage_runs]
            for stage, stage_runs in runs.items()}


def _check_lineage(parent: Run, cfg: Config, stage: str, text: str, where: str) -> None:
    for dotted in LINEAGE:
        section, key = dotted.split(".")
        mine, theirs = getattr(getattr(cfg, section), key), getattr(getattr(parent.cfg, section), key)
        if mine != theirs:
            raise BipError(f"{where}: {stage} of cell [{text}] has {dotted}={mine} but its "
                           f"{parent.stage} has {theirs}; set it in the grid's axes or set")
