"""The numbers of the report, computed from the index rows and the run folders: pure functions.

``load(root)`` reads ROOT/index.csv and, per run, the ``hashed`` fields its config.yaml
records; ``build(rows)`` groups them into panels (dataset, arch, layer type), curves (one
method setting) and points (one k of a curve, over seeds) and computes every table.

- A method setting is the run's hashed fields minus the seed (never hashed), k and what the
  panel and method already say, plus the settings of its ancestors (prefixed with their stage:
  ``pretrain:train.epochs``), so a swept bip.gamma gives one curve per value. Runs without a
  readable config.yaml fall back to the index's ``section.key`` columns.
- A point uses ONE stage for all its seeds: the finetune runs when it has any, done or not, else
  the prune runs, so a grid still running never mixes finetuned and unfinetuned seeds. A curve
  says which: ``as pruned`` or ``after finetune``.
- Only done runs are averaged; the others are listed with their status.
- mean, sample std (n - 1; 0 for one seed), and a 95 % percentile bootstrap interval of the
  mean (scipy.stats.bootstrap, fixed seed) where a point has >= 3 seeds.
"""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

from bip.errors import BipError

INDEX = "index.csv"
PANEL = ("dataset", "arch", "layer_type")
# Hashed fields that do not tell two settings apart: the x axis, the lineage link (an id that
# changes with k; the ancestors' own settings are followed instead), what the panel and the
# method already say. The seed is never hashed; it is dropped in case an older run hashed it.
NOT_A_SETTING = {"prune.k", "run.parent", "run.source_sha256", "run.stage", "data.dataset",
                 "model.arch", "prune.layer_type", "prune.method", "run.seed"}
BOOTSTRAP_MIN_SEEDS = 3
STAGE_LABEL = {"prune": "as pruned", "finetune": "after finetune"}


# ---------------------------------------------------------------- reading

def read_index(path: Path) -> list[dict]:
    """The rows of an index.csv, with numbers, booleans and empty cells typed as collect wrote them."""
    try:
        with open(path, newline="") as f:
            return [{k: typed_cell(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except OSError as err:
        raise BipError(f"cannot read {path}: {err.strerror} (run launch/collect.py ROOT first)") from None
    except csv.Error as err:
        raise BipError(f"{path} is not a CSV index: {err}") from None


def typed_cell(text):
    """An index cell as the value it was written from (None, bool, int, float or text)."""
    if text is None or text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def load(root: Path) -> list[dict]:
    """ROOT/index.csv's rows, each with ``_hashed`` (config.yaml's hashed fields, None when the
    file is missing or unreadable)."""
    root = Path(root)
    if not root.is_dir():
        raise BipError(f"{root} is not a directory")
    rows = read_index(root / INDEX)
    if rows and "path" not in rows[0]:
        raise BipError(f"{root / INDEX} has no path column: not an index written by launch/collect.py")
    for row in rows:
        row["_hashed"] = _hashed(root / str(row.get("path") or ""))
    return rows


def _hashed(folder: Path) -> dict | None:
    try:
        text = (folder / "config.yaml").read_text()
    except OSError:
        return None
    try:  # written in JSON syntax (bip/identity.py), which the json module reads 10x faster
        doc = json.loads(text)
    except ValueError:
        import yaml

        from bip.config.load import safe_load  # duplicate keys refused
        try:
            doc = safe_load(text)
        except yaml.YAMLError:
            return None
    hashed = doc.get("hashed") if isinstance(doc, dict) else None
    return hashed if isinstance(hashed, dict) else None


def read_layers(folder: Path) -> dict | None:
    """Per-layer kept fractions of one run: mask.pt's report (bip/train.py _mask_file), as
    {layer: kept_fraction}; None without a readable mask (torch is imported only here)."""
    path = Path(folder) / "mask.pt"
    if not path.is_file():
        return None
    try:
        import torch
        doc = torch.load(path, map_location="cpu", weights_only=True)
        layers = doc["report"]["layers"]
        return {name: float(entry["kept_fraction"]) for name, entry in layers.items()}
    except Exception:  # noqa: BLE001 - a damaged or foreign mask file only loses its bar chart
        return None


# ---------------------------------------------------------------- grouping

def number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return value


def _own_setting(row: dict) -> tuple:
    hashed = row.get("_hashed")
    if hashed is None:  # no config.yaml: every config column of the index but the seed
        hashed = {k: v for k, v in row.items() if "." in k and not k.startswith("_") and v is not None}
    return tuple(sorted((k, json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v)
                        for k, v in hashed.items() if k not in NOT_A_SETTING))


def settings(rows: list[dict]) -> None:
    """Set ``_setting`` of every row: its own setting plus its ancestors' (prefixed with their
    stage); an IMP round's parent is the round before, whose setting is the same curve's."""
    by_path = {row.get("path"): row for row in rows}
    memo: dict = {}

    def parent_of(row):
        seed = str(row.get("path") or "/").split("/")[-1]
        return by_path.get(f"{row.get('parent_id')}/{seed}") if row.get("parent_id") else None

    def lineage(row, prefix, depth=0):
        key = (row.get("path"), prefix)
        if key in memo:
            return memo[key]
        parent = parent_of(row) if depth < 64 else None  # a cycle in damaged files stops here
        if parent is not None and parent.get("stage") == row.get("stage"):
            value = lineage(parent, prefix, depth + 1)
        else:
            value = tuple((f"{prefix}{k}", v) for k, v in _own_setting(row))
            if parent is not None:
                value += lineage(parent, f"{parent.get('stage')}:", depth + 1)
        memo[key] = value
        return value

    for row in rows:
        stage = row.get("stage")
        parent = parent_of(row)
        if stage == "finetune":
            row["_prune_setting"] = tuple(sorted(lineage(parent, ""))) if parent else ()
            row["_tuned"] = tuple((f"finetune:{k}", v) for k, v in _own_setting(row))
        else:
            row["_prune_setting"], row["_tuned"] = tuple(sorted(lineage(row, ""))), ()


def stats(runs: list[dict], seed: int = 0) -> dict:
    """n, mean, std, 95 % bootstrap CI (>= 3 seeds) of the done runs' test accuracy; the runs
    that are not done, listed; collapsed count; kept fraction and lineage compute means."""
    done = [r for r in runs if r.get("status") == "done" and number(r.get("test_acc")) is not None]
    accs = [float(r["test_acc"]) for r in done]
    point = {"n": len(accs), "accs": accs, "seeds": sorted(r.get("seed") for r in done if r.get("seed") is not None),
             "mean": statistics.fmean(accs) if accs else None,
             "std": statistics.stdev(accs) if len(accs) > 1 else 0.0 if accs else None,
             "ci": bootstrap_ci(accs, seed) if len(accs) >= BOOTSTRAP_MIN_SEEDS else None,
             "not_done": [r for r in runs if r not in done],
             "collapsed": sum(r.get("collapsed") is True for r in done),
             "runs": done}
    for column in ("kept_fraction", "lineage_train_passes", "lineage_wall_time_s", "train_passes"):
        values = [float(r[column]) for r in done if number(r.get(column)) is not None]
        # a mean over some seeds only would compare unlike things: all seeds or nothing
        point[column] = statistics.fmean(values) if values and len(values) == len(done) else None
    return point


_CI_CACHE: dict = {}


def bootstrap_ci(values: list[float], seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean (2,000 resamples, fixed seed: the report
    is the same every time it is built)."""
    key = tuple(values)
    if key not in _CI_CACHE:
        if len(set(values)) == 1:  # scipy warns on a degenerate sample; the interval is the value
            _CI_CACHE[key] = (values[0], values[0])
        else:
            from scipy.stats import bootstrap
            res = bootstrap((values,), _mean_axis,
                            n_resamples=2000, confidence_level=0.95, method="percentile",
                            random_state=seed, vectorized=True)
            _CI_CACHE[key] = (float(res.confidence_interval.low), float(res.confidence_interval.high))
    return _CI_CACHE[key]


def _mean_axis(sample, axis=-1):
    return sample.mean(axis=axis)


def build(rows: list[dict]) -> list[dict]:
    """One panel per (dataset, arch, layer_type) with pruned runs (or, with only pretrain runs,
    per (dataset, arch)), each: dense stats, curves and their points, the tables."""
    settings(rows)
    dense_runs = defaultdict(list)
    pruned = defaultdict(lambda: {"prune": [], "finetune": []})
    for row in rows:
        stage = row.get("stage")
        if stage == "pretrain":
            dense_runs[(row.get("dataset"), row.get("arch"))].append(row)
        elif stage in ("prune", "finetune") and number(row.get("k")) is not None:
            key = (*(row.get(c) for c in PANEL), row.get("method"), row["_prune_setting"], row["k"])
            pruned[key][stage].append(row)
    curves: dict = defaultdict(dict)  # (panel..., method, setting, stage) -> {k: runs}
    for key, stages in pruned.items():
        stage = "finetune" if stages["finetune"] else "prune"
        by_tuned = defaultdict(list)
        for row in stages[stage]:
            by_tuned[row["_tuned"]].append(row)
        for tuned, runs in by_tuned.items():
            curves[(*key[:4], key[4] + tuned, stage)][key[5]] = runs
    panels = sorted({key[:3] for key in curves}, key=repr)
    covered = {p[:2] for p in panels}
    panels += sorted({(d, a, None) for d, a in dense_runs if (d, a) not in covered}, key=repr)
    out = []
    for panel in panels:
        mine = {key: points for key, points in curves.items() if key[:3] == panel}
        labels = _labels(mine)
        entry = {"dataset": panel[0], "arch": panel[1], "layer_type": panel[2],
                 "title": " / ".join(str(p) for p in panel if p is not None),
                 "dense": stats(dense_runs.get(panel[:2], [])), "curves": []}
        for key in sorted(mine, key=lambda c: (str(c[3]), labels[c])):
            points = {k: stats(runs) for k, runs in mine[key].items()}
            entry["curves"].append({"method": key[3], "stage": key[5], "setting": key[4],
                                    "label": labels[key],
                                    "points": dict(sorted(points.items(), key=lambda kv: -kv[0]))})
        _finish(entry)
        out.append(entry)
    return out


def _labels(curves: dict) -> dict:
    """The method, the settings in which curves of that method differ, and the stage used:
    ``bip (bip.gamma=10.0, as pruned)``; a field a curve lacks shows as ``default``."""
    labels = {}
    for key in curves:
        others = [dict(o[4]) for o in curves if o[3] == key[3]]
        varying = sorted({k for s in others for k in s if len({repr(t.get(k)) for t in others}) > 1})
        mine = dict(key[4])
        parts = [f"{name}={mine.get(name, 'default')}" for name in varying]
        labels[key] = f"{key[3]} ({', '.join(parts + [STAGE_LABEL[key[5]]])})"
    return labels


def _finish(panel: dict) -> None:
    """The per-panel tables: ks, seed flags, winning tickets, best cells, compute ratio to IMP."""
    points = [p for c in panel["curves"] for p in c["points"].values()]
    panel["ks"] = sorted({k for c in panel["curves"] for k in c["points"]}, reverse=True)
    counts = [p["n"] for p in points if p["n"]]  # the dense pretrain often has its own seed count
    panel["max_n"] = max(counts, default=0)
    for p in points + [panel["dense"]]:
        p["flagged"] = 0 < p["n"] < panel["max_n"]  # fewer seeds than the rest of the panel
    dense = panel["dense"]["mean"]
    for c in panel["curves"]:
        c["winning"] = None
        if dense is not None:
            wins = [k for k, p in c["points"].items() if p["n"] and p["mean"] >= dense]
            c["winning"] = min(wins) if wins else None
    sparsest = [c["winning"] for c in panel["curves"] if c["winning"] is not None]
    for c in panel["curves"]:
        c["winning_best"] = c["winning"] is not None and c["winning"] == min(sparsest)
    panel["best"] = {}
    for k in panel["ks"]:
        means = [c["points"][k]["mean"] for c in panel["curves"] if k in c["points"] and c["points"][k]["n"]]
        panel["best"][k] = max(means) if means else None
    imp = [c for c in panel["curves"] if c["method"] == "imp"]
    # the IMP curve with the most points is the reference (several are rare: a swept imp_rate)
    ref = max(imp, key=lambda c: len(c["points"]), default=None)
    panel["imp_label"] = ref["label"] if ref else None
    for c in panel["curves"]:
        for k, p in c["points"].items():
            base = ref["points"].get(k, {}).get("lineage_train_passes") if ref else None
            mine = p["lineage_train_passes"]
            p["imp_ratio"] = mine / base if mine is not None and base else None
    panel["not_done"] = [r for c in panel["curves"] for p in c["points"].values() for r in p["not_done"]]
    panel["not_done"] += panel["dense"]["not_done"]
    panel["collapsed_runs"] = sum(p["collapsed"] for p in points)
    panel["exports"] = [r for c in panel["curves"] for p in c["points"].values() for r in p["runs"]
                        if number(r.get("macs_thin")) is not None or number(r.get("speedup")) is not None]


def winning_table(panels: list[dict]) -> tuple[list[str], list[tuple[str, list]]]:
    """Across panels: columns are panels, rows method settings, cells (k, point) or None; a
    panel without dense runs has no winning tickets."""
    columns = [p["title"] for p in panels if p["curves"]]
    rows: dict = {}
    for i, p in enumerate(q for q in panels if q["curves"]):
        for c in p["curves"]:
            cells = rows.setdefault(c["label"], [None] * len(columns))
            if c["winning"] is not None:
                cells[i] = (c["winning"], c["points"][c["winning"]], c["winning_best"])
            elif p["dense"]["mean"] is not None and cells[i] is None:
                cells[i] = "x"
    return columns, sorted(rows.items())


def select_layer_runs(panel: dict, most_ks: int = 3) -> dict:
    """Runs whose per-layer density the report draws: at the densest, a middle and the sparsest k
    (``most_ks`` ks: more subplots take long to draw and long to read), the first done run (lowest
    seed) of each method (its first setting), {k: [(label, run)]}."""
    chosen: dict = defaultdict(list)
    seen = set()
    for c in panel["curves"]:
        for k, p in c["points"].items():
            if (c["method"], k) in seen or not p["runs"]:
                continue
            seen.add((c["method"], k))
            run = min(p["runs"], key=lambda r: (r.get("seed") is None, r.get("seed") or 0))
            chosen[k].append((c["label"], run))
    ks = sorted(chosen, reverse=True)
    if len(ks) > most_ks:
        ks = sorted({ks[round(i * (len(ks) - 1) / (most_ks - 1))] for i in range(most_ks)}, reverse=True)
    return {k: chosen[k] for k in ks}


def provenance(rows: list[dict], root: Path) -> dict:
    """What the report stamps: git shas (dirty marked), grids, run and seed counts, devices."""
    shas = sorted({f"{r['git_sha']}{'+dirty' if r.get('git_dirty') is True else ''}"
                   for r in rows if r.get("git_sha")})
    grids_dir = Path(root) / "_grids"
    grids = sorted(p.stem for p in grids_dir.glob("*.json")) if grids_dir.is_dir() else []
    statuses: dict = defaultdict(int)
    for r in rows:
        statuses[str(r.get("status"))] += 1
    return {"shas": shas, "grids": grids, "runs": len(rows),
            "seeds": len({r.get("seed") for r in rows if r.get("seed") is not None}),
            "devices": sorted({str(r["device"]) for r in rows if r.get("device")}),
            "statuses": dict(sorted(statuses.items())), "root": os.path.abspath(root)}


def fmt_k(k) -> str:
    return f"{round(100 * (1 - k), 4):g}%"


def fmt_point(p: dict, digits: int = 2) -> str:
    """``acc ± std (n)``, a dagger when the point has fewer seeds than the rest of its panel."""
    if not p or not p["n"]:
        return "not done" if p and p["not_done"] else ""
    return f"{p['mean']:.{digits}f} ± {p['std']:.{digits}f} ({p['n']}){'†' if p['flagged'] else ''}"
