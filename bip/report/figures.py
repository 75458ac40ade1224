"""The report's figures as inline SVG strings (matplotlib's Agg-free SVG canvas; no display,
no global backend touched), drawn from tables.build's panels in bip.report.style's colours.

Text stays text in the SVG (svg.fonttype none): the file is smaller and the browser draws the
labels in its sans-serif font. Each figure gets its own hash salt, so the ids inside two inline
SVGs (clip paths) never clash in one HTML page.
"""
from __future__ import annotations

import io
import math
from collections import defaultdict

from bip.errors import BipError
from bip.report import style
from bip.report.tables import fmt_k, number

# Sparsity ticks (percent) the x axis may label; -log10(k) spreads 50 %, 90 %, 99 % evenly.
_TICKS = (0, 20, 50, 70, 80, 90, 95, 98, 99, 99.5, 99.8, 99.9, 99.95, 99.99)


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_svg import FigureCanvasSVG
        from matplotlib.figure import Figure
    except ImportError:
        raise BipError("the report needs matplotlib: pip install -e '.[plots]'") from None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasSVG(fig)
    return fig


def _svg(fig, salt: str) -> str:
    import matplotlib
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        # no RDF block (date, creator): the page stays the same for the same runs, and smaller
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: it is inline


def _x(k: float) -> float:
    return -math.log10(k)


def _sparsity_axis(ax, ks) -> None:
    xs = [_x(k) for k in ks]
    ticks = [t for t in _TICKS if min(xs) - 0.05 <= _x(1 - t / 100) <= max(xs) + 0.05]
    ax.set_xticks([_x(1 - t / 100) for t in ticks], [f"{t:g}" for t in ticks])
    ax.set_xlabel(style.SPARSITY_LABEL)


def _dense_band(ax, dense: dict) -> None:
    if dense["n"]:
        mean, std = dense["mean"], dense["std"]
        ax.axhspan(mean - std, mean + std, color="0.6", alpha=0.25, lw=0)
        ax.axhline(mean, color=style.color("dense"), ls="--", lw=1,
                   label=f"dense {mean:.2f} ± {std:.2f} (n={dense['n']})")


def accuracy_vs_sparsity(panel: dict, salt: str) -> str | None:
    """Test accuracy against sparsity, one curve per method setting: mean ± std error bars,
    n next to each point, the 95 % bootstrap band where a point has >= 3 seeds, dense as a
    band, collapsed points ringed."""
    curves = [c for c in panel["curves"] if any(p["n"] for p in c["points"].values())]
    if not curves:
        return None
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    _dense_band(ax, panel["dense"])
    style_of = _styles(curves)
    collapsed_x, collapsed_y = [], []
    for c in curves:
        pts = [(k, p) for k, p in c["points"].items() if p["n"]]
        xs, ys = [_x(k) for k, _ in pts], [p["mean"] for _, p in pts]
        color, ls = style_of[c["label"]]
        ax.errorbar(xs, ys, yerr=[p["std"] for _, p in pts], color=color, ls=ls, marker=style.marker(c["method"]),
                    ms=5, capsize=3, lw=1.4, label=c["label"])
        band = [(x, p["ci"]) for x, (_, p) in zip(xs, pts) if p["ci"]]
        if len(band) > 1:
            ax.fill_between([b[0] for b in band], [b[1][0] for b in band], [b[1][1] for b in band],
                            color=color, alpha=0.15, lw=0)
        for x, y, (_, p) in zip(xs, ys, pts):
            ax.annotate(f"n={p['n']}", (x, y), xytext=(4, -10), textcoords="offset points", fontsize=6,
                        color="0.35")
            if p["collapsed"]:
                collapsed_x.append(x)
                collapsed_y.append(y)
    if collapsed_x:
        ax.scatter(collapsed_x, collapsed_y, s=140, facecolors="none", edgecolors=style.COLLAPSED_COLOR,
                   linewidths=1.5, zorder=5, label="collapsed (a seed's network disconnected)")
    _sparsity_axis(ax, [k for c in curves for k in c["points"]])
    ax.set_ylabel(style.ACC_LABEL)
    ax.set_title(f"{panel['title']}: accuracy vs sparsity (bars: std; band: 95% bootstrap CI, >= 3 seeds)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _svg(fig, salt)


def _styles(curves: list[dict]) -> dict:
    """Colour by method, line style by the curve's rank among that method's curves."""
    seen: dict = defaultdict(int)
    out = {}
    for c in curves:
        out[c["label"]] = (style.color(c["method"]), style.LINESTYLES[seen[c["method"]] % len(style.LINESTYLES)])
        seen[c["method"]] += 1
    return out


def accuracy_vs_compute(panel: dict, salt: str) -> str | None:
    """Test accuracy against the lineage's training passes and, where recorded, its wall hours
    (log axes); one marker per (curve, k), labelled with k, and the dense pretrain."""
    series = [("lineage_train_passes", 1.0, style.PASSES_LABEL), ("lineage_wall_time_s", 3600.0, style.HOURS_LABEL)]
    series = [s for s in series if any(p[s[0]] for c in panel["curves"] for p in c["points"].values())]
    if not series:
        return None
    fig = _figure(5.2 * len(series), 4.4)
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    style_of = _styles(panel["curves"])
    for ax, (column, scale, label) in zip(axes, series):
        dense = panel["dense"]
        if dense["n"] and dense[column]:
            ax.errorbar([dense[column] / scale], [dense["mean"]], yerr=[dense["std"]], color=style.color("dense"),
                        marker="s", ms=5, capsize=3, ls="none", label="dense")
        for c in panel["curves"]:
            pts = [(k, p) for k, p in c["points"].items() if p["n"] and p[column]]
            if not pts:
                continue
            xs = [p[column] / scale for _, p in pts]
            color, ls = style_of[c["label"]]
            # a line only where compute grows as k falls (an IMP lineage); other curves' points
            # may share their compute
            line = ls if len(xs) > 1 and all(a < b for a, b in zip(xs, xs[1:])) else "none"
            ax.errorbar(xs, [p["mean"] for _, p in pts], yerr=[p["std"] for _, p in pts], color=color, ls=line,
                        marker=style.marker(c["method"]), ms=5, capsize=3, label=c["label"])
            for x, (k, p) in zip(xs, pts) if len(panel["curves"]) <= 6 else ():  # beyond, unreadable
                ax.annotate(f"k={k:g}", (x, p["mean"]), xytext=(4, 3), textcoords="offset points",
                            fontsize=6, color="0.35")
        style.log_axis(ax, "x")
        ax.set_xlabel(label)
        ax.set_ylabel(style.ACC_LABEL)
        ax.grid(alpha=0.3, which="major")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{panel['title']}: accuracy vs lineage compute", fontsize=10)
    return _svg(fig, salt)


def layer_density(selected: dict, layers: dict, title: str, salt: str) -> str | None:
    """Grouped bars per layer: the kept fraction of each selected run, one subplot per k.
    ``selected``: {k: [(label, run)]}; ``layers``: {run path: {layer: kept fraction}}."""
    rows = [(k, [(label, layers[r["path"]]) for label, r in runs if layers.get(r["path"])])
            for k, runs in selected.items()]
    rows = [(k, bars) for k, bars in rows if bars]
    if not rows:
        return None
    names = list(dict.fromkeys(name for _, bars in rows for _, per in bars for name in per))
    fig = _figure(max(7.0, 0.28 * len(names) + 2), 2.2 * len(rows) + 0.8)
    axes = fig.subplots(len(rows), 1, squeeze=False, sharex=True)[:, 0]
    for ax, (k, bars) in zip(axes, rows):
        width = 0.8 / len(bars)
        for i, (label, per) in enumerate(bars):
            xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(names))]
            ax.bar(xs, [per.get(n, float("nan")) for n in names], width=width, color=style.color(label),
                   label=label, lw=0)
        ax.axhline(k, color="0.3", ls=":", lw=1)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("kept fraction")
        ax.set_title(f"k = {k:g} (sparsity {fmt_k(k)}; dotted: k)", fontsize=8, loc="left")
        ax.legend(fontsize=6, loc="upper right")
        ax.grid(alpha=0.3, axis="y")
    axes[-1].set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    axes[-1].set_xlabel("layer (model order)")
    fig.suptitle(f"{title}: per-layer density of one run per method and k", fontsize=10)
    return _svg(fig, salt)


def export_speedup(panel: dict, salt: str) -> str | None:
    """MAC reduction (dense / thin MACs) against measured speedup, one point per exported run."""
    pts = [(r, r["macs_dense"] / r["macs_thin"], r["speedup"]) for r in panel["exports"]
           if number(r.get("macs_dense")) and number(r.get("macs_thin")) and number(r.get("speedup"))]
    if not pts:
        return None
    fig = _figure(5.2, 4.2)
    ax = fig.add_subplot()
    for method in sorted({r.get("method") for r, _, _ in pts}, key=str):
        mine = [(x, y) for r, x, y in pts if r.get("method") == method]
        ax.scatter([x for x, _ in mine], [y for _, y in mine], color=style.color(str(method)),
                   marker=style.marker(str(method)), label=str(method))
    top = max(max(x for _, x, _ in pts), max(y for _, _, y in pts)) * 1.1
    ax.plot([1, top], [1, top], color="0.5", ls=":", lw=1, label="speedup = MAC reduction")
    ax.set_xlabel("MAC reduction (dense MACs / thin MACs, x)")
    ax.set_ylabel("measured speedup (dense / thin latency, x)")
    ax.set_title(f"{panel['title']}: exported models", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _svg(fig, salt)
