"""Accuracy-vs-sparsity figures and the markdown summary, computed from index rows.

Pure functions of the rows ``launch.collect`` builds: ``summarize`` makes one entry per curve
point, the others turn entries into markdown and PNG bytes, and collect writes the files.
matplotlib is optional (``pip install -e '.[plots]'``) and only imported to draw, on the Agg
canvas, so no display or global backend is touched.

Which runs count, per (dataset, arch, layer_type, method, k, seed): the last stage available,
i.e. the finetune run if one is done, else the prune run. Only done runs count. The dense
reference of a (dataset, arch) is every done pretrain run of it. Mean and std are over the
points of a (method, k): std is the sample std (n - 1), 0 for a single point.
"""
from __future__ import annotations

import io
import math
import re
import statistics
import sys
from collections import defaultdict

from bip.errors import BipError

_LAST_STAGE = ("finetune", "prune")  # preferred first
# Sparsity ticks (percent) the x axis may label; -log10(k) spreads 20 % ... 99.9 % evenly.
_TICKS = (0, 20, 50, 70, 80, 90, 95, 98, 99, 99.5, 99.8, 99.9, 99.95, 99.99)


def final_points(rows: list[dict]) -> list[dict]:
    """The rows that stand for each (dataset, arch, layer_type, method, k, seed): the finetune
    runs if any is done, else the prune runs. Several runs for one key (e.g. two settings of
    another hyperparameter) are all kept, and a warning says they are pooled."""
    groups = defaultdict(list)
    for row in rows:
        if row.get("status") == "done" and row.get("stage") in _LAST_STAGE:
            key = tuple(row.get(c) for c in ("dataset", "arch", "layer_type", "method", "k", "seed"))
            groups[key].append(row)
    points = []
    for key, group in sorted(groups.items(), key=lambda item: repr(item[0])):
        stage = next(s for s in _LAST_STAGE if any(r["stage"] == s for r in group))
        chosen = [r for r in group if r["stage"] == stage]
        if len(chosen) > 1:
            print(f"warning: {len(chosen)} {stage} runs for {'/'.join(map(str, key))}; pooled",
                  file=sys.stderr)
        points += chosen
    return points


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (dataset, arch, layer_type, method, k), the dense reference first in each
    panel: n, stages used, mean/std test accuracy, mean measured kept fraction."""
    dense = _group(r for r in rows if r.get("status") == "done" and r.get("stage") == "pretrain")
    curves = _group(final_points(rows))
    panels = sorted({key[:3] for key in curves}, key=repr)
    covered = {panel[:2] for panel in panels}
    # A (dataset, arch) with only pretrain runs still gets its dense line in the summary.
    panels += sorted({key[:2] + ("dense",) for key in dense if key[:2] not in covered}, key=repr)
    entries = []
    for panel in panels:
        entries += [_stats(panel, key, dense[key]) for key in dense if key[:2] == panel[:2]]
        entries += [_stats(panel, key, curves[key]) for key in sorted(curves, key=_curve_order)
                    if key[:3] == panel]
    return entries


def _group(rows) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for row in rows:
        key = tuple(row.get(c) for c in ("dataset", "arch", "layer_type", "method", "k"))
        groups[key].append(row)
    return dict(sorted(groups.items(), key=lambda item: repr(item[0])))


def _curve_order(key: tuple) -> tuple:
    return (str(key[3]), -_number(key[4], 0.0))


def _stats(panel: tuple, key: tuple, runs: list[dict]) -> dict:
    accs = [float(r["test_acc"]) for r in runs if _number(r.get("test_acc")) is not None]
    kept = [float(r["kept_fraction"]) for r in runs if _number(r.get("kept_fraction")) is not None]
    return {
        "dataset": panel[0], "arch": panel[1], "layer_type": panel[2], "method": key[3], "k": key[4],
        "stage": "+".join(sorted({str(r.get("stage")) for r in runs}, key=_stage_rank)),
        "n": len(accs), "test_acc_mean": statistics.fmean(accs) if accs else None,
        "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0 if accs else None,
        "kept_fraction_mean": statistics.fmean(kept) if kept else None,
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
                      "| method | k | sparsity | test acc (%) | n | kept fraction | stage |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        acc = f"{e['test_acc_mean']:.2f} ± {e['test_acc_std']:.2f}" if e["n"] else ""
        kept = "" if e["kept_fraction_mean"] is None else f"{e['kept_fraction_mean']:.4f}"
        k = f"{e['k']:g}" if _number(e["k"]) is not None else str(e["k"])
        lines.append(f"| {e['method']} | {k} | {_sparsity(e['k'])} | {acc} | {e['n']} | {kept} "
                     f"| {e['stage']} |")
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


def _draw(ax, panel: tuple, curves: list[dict], dense: list[dict]) -> None:
    """Accuracy against -log10(k): equal steps for 90 %, 99 %, 99.9 % sparsity, as in BiP's figures."""
    for e in dense:
        if e["n"]:
            mean, std = e["test_acc_mean"], e["test_acc_std"]
            ax.axhspan(mean - std, mean + std, color="0.5", alpha=0.2, lw=0)
            ax.axhline(mean, color="0.3", ls="--", lw=1, label=f"dense (n={e['n']})")
    by_method = defaultdict(list)
    for e in curves:
        by_method[e["method"]].append(e)
    for method, points in sorted(by_method.items()):
        points.sort(key=lambda e: -e["k"])
        ax.errorbar([-math.log10(e["k"]) for e in points], [e["test_acc_mean"] for e in points],
                    yerr=[e["test_acc_std"] for e in points], marker="o", ms=4, capsize=3, label=method)
    xs = [-math.log10(e["k"]) for e in curves]
    ticks = [t for t in _TICKS if min(xs) - 0.05 <= -math.log10(1 - t / 100) <= max(xs) + 0.05]
    ax.set_xticks([-math.log10(1 - t / 100) for t in ticks], [f"{t:g}" for t in ticks])
    ax.set_xlabel("sparsity 1 - k (%), axis -log10(k)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(" / ".join(map(str, panel)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
