"""Accuracy-vs-sparsity figures and the markdown summary, computed from index rows.

Pure functions of the rows ``launch.collect`` builds: ``summarize`` makes one entry per curve
point, the others turn entries into markdown and PNG bytes, and collect writes the files.
matplotlib is optional (``pip install -e '.[plots]'``) and only imported to draw, on the Agg
canvas, so no display or global backend is touched.

Curves and points (``_curves``): a curve is one method with one setting, i.e. everything that
differs between runs except the seed and k (a swept bip.gamma or bip.variant gives one legend
entry per value); a point is one k of a curve, averaged over seeds, and uses ONE stage: its
finetune runs if it has any (done or not), else its prune runs. Only done runs count. The dense
reference of a (dataset, arch) is every done pretrain run of it. Mean and std are over the seeds
of a point: std is the sample std (n - 1), 0 for a single point.
"""
from __future__ import annotations

import io
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/plots.py`: make `bip` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bip.errors import BipError  # noqa: E402
from bip.report.tables import typed_cell  # noqa: E402
from bip.report import style  # noqa: E402  (the one palette: the same colour per method everywhere)

# Sparsity ticks (percent) the x axis may label; -log10(k) spreads 20 % ... 99.9 % evenly.
_TICKS = (0, 20, 50, 70, 80, 90, 95, 98, 99, 99.5, 99.8, 99.9, 99.95, 99.99)
_PANEL = ("dataset", "arch", "layer_type")
# Hashed fields that are not a curve's setting: the x axis, the lineage link, what the panel and
# the method already say. The seed is never hashed: seeds are what a point averages over.
_NOT_A_SETTING = {"prune.k", "run.parent", "run.source_sha256", "run.stage", "data.dataset",
                  "model.arch", "prune.layer_type", "prune.method"}


def _setting(row: dict, cache: dict) -> tuple:
    """The result-affecting settings of a run: the fields its run id hashes (the index's
    ``hashed`` column, from config.yaml) as sorted pairs, minus _NOT_A_SETTING."""
    text = row.get("hashed") or "{}"
    if text not in cache:
        try:
            hashed = json.loads(text) if isinstance(text, str) else {}
        except ValueError:
            hashed = {}
        cache[text] = tuple(sorted((k, json.dumps(v) if isinstance(v, (dict, list)) else v)
                                   for k, v in hashed.items() if k not in _NOT_A_SETTING))
    return cache[text]


def _curves(rows: list[dict]) -> dict[tuple, dict]:
    """The pruned curves: {(dataset, arch, layer_type, method, setting): {k: (stage, [rows])}}.

    A point (one k of one curve) is ONE stage for all its seeds: the finetune runs when the
    point has any (done or not, so that a grid still running never mixes finetuned and
    unfinetuned seeds in one mean), else the prune runs; only done runs count. A curve's setting
    is everything its runs' ids cover except the seed and k: its own fields and, prefixed with
    the stage, those of its prune and pretrain ancestors, so a swept bip.gamma or bip.variant
    gives one curve per value, finetuned or not."""
    by_path = {row.get("path"): row for row in rows}
    cache: dict = {}
    examples = {}  # curve -> one of its prune rows (labels tell which fields it reads)

    def lineage(row: dict, prefix: str) -> tuple:
        seed = str(row.get("path", "/")).split("/")[-1]
        parent = by_path.get(f"{row.get('parent_id')}/{seed}") if row.get("parent_id") else None
        if parent is not None and parent.get("stage") == row.get("stage"):
            # An IMP round's parent is the round before (bip/imp.py), whose settings are its own
            # but for k: the whole lineage is one curve.
            return lineage(parent, prefix)
        own = tuple((f"{prefix}{k}", v) for k, v in _setting(row, cache))
        return own + (lineage(parent, f"{parent.get('stage')}:") if parent else ())

    points: dict[tuple, dict[str, list]] = defaultdict(lambda: {"prune": [], "finetune": []})
    for row in rows:
        stage = row.get("stage")
        if stage not in ("prune", "finetune") or _number(row.get("k")) is None:
            continue
        seed = str(row.get("path", "/")).split("/")[-1]
        parent = by_path.get(f"{row.get('parent_id')}/{seed}") if row.get("parent_id") else None
        if stage == "finetune":  # the point is its prune run's; the finetune's own fields split it
            prune_setting = lineage(parent, "") if parent else ()
            tuned = tuple((f"finetune:{k}", v) for k, v in _setting(row, cache))
        else:
            prune_setting, tuned = lineage(row, ""), ()
        key = tuple(row.get(c) for c in (*_PANEL, "method")) + (tuple(sorted(prune_setting)),)
        points[key + (row["k"],)][stage].append((tuned, row))
        examples.setdefault(key[:4] + (key[4] + tuned,), parent if stage == "finetune" else row)
    curves: dict[tuple, dict] = defaultdict(dict)
    for key, stages in points.items():
        stage = "finetune" if stages["finetune"] else "prune"
        groups = defaultdict(list)
        for tuned, row in stages[stage]:
            if row.get("status") == "done":
                groups[tuned].append(row)
            else:
                groups.setdefault(tuned, [])
        for tuned, chosen in groups.items():
            seeds = [str(r.get("seed")) for r in chosen]
            if len(seeds) != len(set(seeds)):
                print(f"warning: several {stage} runs of one seed for {'/'.join(map(str, key[:4]))} "
                      f"k={key[-1]}; pooled", file=sys.stderr)
            curves[key[:-2] + (key[-2] + tuned,)][key[-1]] = (stage, chosen)
    return {key: {"points": points_, "example": examples.get(key)} for key, points_ in curves.items()}


def _labels(curves: dict[tuple, dict]) -> dict[tuple, str]:
    """A legend entry per curve: the method, plus the settings in which curves of that method
    (in that panel) differ, e.g. ``bip (bip.gamma=10.0, bip.variant=paper)``; a default value is
    shown where the curve's runs read that field (bip.gamma is not shown for the reference
    variant, which ignores it)."""
    from bip.config import Config
    defaults = Config().to_dict()
    labels = {}
    for key, curve in curves.items():
        settings = [dict(other[4]) for other in curves if other[:4] == key[:4]]
        varying = sorted({k for s in settings for k in s if len({repr(t.get(k)) for t in settings}) > 1})
        mine, unused = dict(key[4]), _unused_fields(curve["example"])
        parts = []
        for name in varying:
            section, _, field = name.rsplit(":", 1)[-1].partition(".")
            if name in mine:
                parts.append(f"{name}={mine[name]}")
            elif ":" in name or not (name in unused or f"{section}.*" in unused):
                parts.append(f"{name}={defaults.get(section, {}).get(field, 'default')}")
        labels[key] = f"{key[3]} ({', '.join(parts)})" if parts else str(key[3])
    return labels


def _unused_fields(row: dict | None) -> set[str]:
    """The config fields a run's stage and method do not read (bip.config.identity), {} if unknown."""
    if row is None:
        return set()
    from bip.config import build_config
    from bip.config.identity import _NOT_HASHED, _unused
    try:
        return _unused(build_config([(k, v, "index") for k, v in row.items()
                                     if "." in k and k not in _NOT_HASHED and v is not None]))
    except BipError:
        return set()


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (panel, curve, k), the dense reference first in each panel: n, the stage
    used, mean/std test accuracy, mean measured kept fraction; ``curve`` is the legend label."""
    dense = _group(r for r in rows if r.get("status") == "done" and r.get("stage") == "pretrain")
    curves = _curves(rows)
    labels = _labels(curves)
    panels = sorted({key[:3] for key in curves}, key=repr)
    covered = {panel[:2] for panel in panels}
    # A (dataset, arch) with only pretrain runs still gets its dense line in the summary.
    panels += sorted({key[:2] + ("dense",) for key in dense if key[:2] not in covered}, key=repr)
    entries = []
    for panel in panels:
        entries += [_stats(panel, "dense", key[4], dense[key], "dense")
                    for key in dense if key[:2] == panel[:2]]
        for key in sorted((c for c in curves if c[:3] == panel), key=lambda c: (str(c[3]), labels[c])):
            points = curves[key]["points"]
            for k in sorted(points, key=lambda k: -_number(k, 0.0)):
                stage, runs = points[k]
                entries.append(_stats(panel, key[3], k, runs, labels[key], stage))
    return entries


def _group(rows) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for row in rows:
        key = tuple(row.get(c) for c in ("dataset", "arch", "layer_type", "method", "k"))
        groups[key].append(row)
    return dict(sorted(groups.items(), key=lambda item: repr(item[0])))


def _stats(panel: tuple, method: str, k, runs: list[dict], curve: str, stage: str | None = None) -> dict:
    accs = [float(r["test_acc"]) for r in runs if _number(r.get("test_acc")) is not None]
    kept = [float(r["kept_fraction"]) for r in runs if _number(r.get("kept_fraction")) is not None]
    passes = [float(r["lineage_train_passes"]) for r in runs if _number(r.get("lineage_train_passes")) is not None]
    return {
        "dataset": panel[0], "arch": panel[1], "layer_type": panel[2], "method": method, "k": k,
        "curve": curve, "stage": stage or "+".join(sorted({str(r.get("stage")) for r in runs}, key=_stage_rank)),
        "n": len(accs), "test_acc_mean": statistics.fmean(accs) if accs else None,
        "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0 if accs else None,
        "kept_fraction_mean": statistics.fmean(kept) if kept else None,
        # bip/collapse.py: seeds whose network ended disconnected (marked in the plots)
        "collapsed": sum(r.get("collapsed") in (True, "True", "true") for r in runs),
        # bip/compute.py: the whole lineage's training passes, when every seed has them
        "lineage_train_passes_mean": statistics.fmean(passes) if passes and len(passes) == len(runs) else None,
    }


def _stage_rank(stage: str) -> int:
    return {"pretrain": 0, "prune": 1, "finetune": 2}.get(stage, 3)


def _number(value, default=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return default
    return value


def _sparsity(k) -> str:
    k = _number(k)
    return "" if k is None else f"{round(100 * (1 - k), 4):g}%"


def summary_markdown(entries: list[dict]) -> str:
    """Per (dataset, arch, layer_type): a table of ``summarize``'s entries, mean ± std test
    accuracy per method and k."""
    lines, panel = [], None
    for e in entries:
        if (e["dataset"], e["arch"], e["layer_type"]) != panel:
            panel = (e["dataset"], e["arch"], e["layer_type"])
            lines += [""] * bool(lines) + [f"## {' / '.join(map(str, panel))}", "",
                      "| method | k | sparsity | test acc (%) | n | kept fraction | stage | collapsed "
                      "| lineage train passes |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
        acc = f"{e['test_acc_mean']:.2f} ± {e['test_acc_std']:.2f}" if e["n"] else ""
        kept = "" if e["kept_fraction_mean"] is None else f"{e['kept_fraction_mean']:.4f}"
        k = f"{e['k']:g}" if _number(e["k"]) is not None else str(e["k"])
        passes = e.get("lineage_train_passes_mean")
        lines.append(f"| {e['curve']} | {k} | {_sparsity(e['k'])} | {acc} | {e['n']} | {kept} "
                     f"| {e['stage']} | {e.get('collapsed') or ''} | {'' if passes is None else f'{passes:.3g}'} |")
    return "\n".join(lines) + "\n" if lines else "No finished runs yet.\n"


def render_panels(entries: list[dict]) -> dict[str, bytes]:
    """One PNG per (dataset, arch, layer_type) of ``summarize``'s entries that has pruned runs:
    file name -> PNG bytes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BipError("plots need matplotlib: pip install -e '.[plots]'") from None
    panels = defaultdict(list)
    for entry in entries:
        panels[(entry["dataset"], entry["arch"], entry["layer_type"])].append(entry)
    pngs = {}
    for panel, entries in panels.items():
        curves = [e for e in entries if e["method"] != "dense" and _number(e["k"]) and e["n"]]
        if not curves:
            continue
        fig = Figure(figsize=(6.4, 4.4), layout="constrained")
        FigureCanvasAgg(fig)
        _draw(fig.add_subplot(), panel, curves, [e for e in entries if e["method"] == "dense"])
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(map(str, panel)))
        pngs[f"{name}.png"] = buffer.getvalue()
    return pngs


def _mark_collapsed(ax, entries: list[dict], x) -> None:
    """A black cross over every point where some seed's network ended disconnected."""
    hit = [e for e in entries if e.get("collapsed")]
    if hit:
        ax.scatter([x(e) for e in hit], [e["test_acc_mean"] for e in hit], marker="x", s=70, c=style.COLLAPSED_COLOR,
                   zorder=5, label="collapsed (some seed disconnected)")


def render_compute(entries: list[dict]) -> dict[str, bytes]:
    """One PNG per panel whose points know their lineage's training passes: test accuracy
    against lineage_train_passes (log axis), one point per (curve, k) and the dense pretrain;
    {} when the index has no compute columns."""
    panels = defaultdict(list)
    for entry in entries:
        if entry["n"] and entry.get("lineage_train_passes_mean"):
            panels[(entry["dataset"], entry["arch"], entry["layer_type"])].append(entry)
    if not panels:
        return {}
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BipError("plots need matplotlib: pip install -e '.[plots]'") from None
    pngs = {}
    for panel, points in panels.items():
        fig = Figure(figsize=(6.4, 4.4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        by_curve = defaultdict(list)
        for e in points:
            by_curve["dense" if e["method"] == "dense" else e["curve"]].append(e)
        for curve, group in sorted(by_curve.items()):
            group.sort(key=lambda e: -_number(e["k"], 1.0))
            xs = [e["lineage_train_passes_mean"] for e in group]
            # A line only where compute grows as k falls (an IMP lineage); elsewhere the points
            # of one curve may share their compute, and each is labelled with its k.
            line = "-" if len(xs) > 1 and all(a < b for a, b in zip(xs, xs[1:])) else "none"
            ax.errorbar(xs, [e["test_acc_mean"] for e in group], yerr=[e["test_acc_std"] for e in group],
                        marker=style.marker(curve), color=style.color(curve), ms=4, capsize=3, ls=line,
                        label=curve)
            for e in group:
                if curve != "dense":
                    ax.annotate(f"{e['k']:g}", (e["lineage_train_passes_mean"], e["test_acc_mean"]),
                                xytext=(4, 2), textcoords="offset points", fontsize=6, color="0.3")
        _mark_collapsed(ax, points, lambda e: e["lineage_train_passes_mean"])
        style.log_axis(ax, "x")  # minor-tick labels of a short log span collided
        ax.set_xlabel("training passes of one example, whole lineage (pretrain + prune + finetune; log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(" / ".join(map(str, panel)) + ": accuracy vs compute")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(map(str, panel)))
        pngs[f"{name}-compute.png"] = buffer.getvalue()
    return pngs


def read_index(path) -> list[dict]:
    """The rows of an index.csv with numbers, booleans and empty cells typed as collect made them."""
    import csv
    try:
        with open(path, newline="") as f:
            return [{k: typed_cell(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except OSError as err:
        raise BipError(f"cannot read {path}: {err.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    """``python launch/plots.py INDEX.csv [--out DIR]``: the accuracy-vs-sparsity panels and,
    where the index has compute columns, the accuracy-vs-compute plots of any index."""
    from bip.rundir.atomic import write_bytes
    from bip.config import OneLineParser
    parser = OneLineParser(prog="plots.py", description=main.__doc__.split("\n")[0])
    parser.add_argument("index", type=Path, help="an index.csv (launch/collect.py)")
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: next to the index, plots/)")
    args = parser.parse_args(argv)
    try:
        entries = summarize(read_index(args.index))
        out = args.out or args.index.parent / "plots"
        pngs = {**render_panels(entries), **render_compute(entries)}
        for name, png in pngs.items():
            write_bytes(out / name, png)
    except (BipError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name in sorted(pngs):
        print(out / name)
    return 0


def _draw(ax, panel: tuple, curves: list[dict], dense: list[dict]) -> None:
    """Accuracy against -log10(k): equal steps for 90 %, 99 %, 99.9 % sparsity, as in BiP's figures."""
    for e in dense:
        if e["n"]:
            mean, std = e["test_acc_mean"], e["test_acc_std"]
            ax.axhspan(mean - std, mean + std, color="0.5", alpha=0.2, lw=0)
            ax.axhline(mean, color="0.3", ls="--", lw=1, label=f"dense (n={e['n']})")
    by_curve = defaultdict(list)
    for e in curves:
        by_curve[e["curve"]].append(e)
    for method, points in sorted(by_curve.items()):
        points.sort(key=lambda e: -e["k"])
        ax.errorbar([-math.log10(e["k"]) for e in points], [e["test_acc_mean"] for e in points],
                    yerr=[e["test_acc_std"] for e in points], marker=style.marker(method), color=style.color(method),
                    ms=4, capsize=3, label=method)
    _mark_collapsed(ax, curves, lambda e: -math.log10(e["k"]))
    xs = [-math.log10(e["k"]) for e in curves]
    ticks = [t for t in _TICKS if min(xs) - 0.05 <= -math.log10(1 - t / 100) <= max(xs) + 0.05]
    ax.set_xticks([-math.log10(1 - t / 100) for t in ticks], [f"{t:g}" for t in ticks])
    ax.set_xlabel("sparsity 1 - k (%), axis -log10(k)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(" / ".join(map(str, panel)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


if __name__ == "__main__":
    sys.exit(main())
