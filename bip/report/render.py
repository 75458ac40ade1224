"""tables.build's panels as the three report files: index.html (jinja2 template, inline SVG),
report.md and tables.tex (booktabs). The markdown and LaTeX tables print the same cells as the
HTML ones: every cell text comes from ``cells``.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

from bip.errors import BipError
from bip.report import figures, tables
from bip.report.tables import fmt_k, fmt_point, number


def results_cells(panel: dict) -> tuple[list[str], list[tuple[str, list[tuple[str, bool]]]]]:
    """Method x k: header, then (label, [(text, bold)]) rows; bold is the best mean of a column."""
    header = ["method"] + [f"{fmt_k(k)} (k={k:g})" for k in panel["ks"]]
    rows = []
    for c in panel["curves"]:
        cells = []
        for k in panel["ks"]:
            p = c["points"].get(k)
            best = bool(p and p["n"] and panel["best"][k] is not None and p["mean"] == panel["best"][k])
            cells.append((fmt_point(p) if p else "", best))
        rows.append((c["label"], cells))
    return header, rows


def ratio_cells(panel: dict) -> tuple[list[str], list[tuple[str, list[tuple[str, bool]]]]] | None:
    """Lineage training passes per point and their ratio to IMP's at the same k."""
    if not any(p["lineage_train_passes"] for c in panel["curves"] for p in c["points"].values()):
        return None
    header = ["method"] + [f"k={k:g}" for k in panel["ks"]]
    rows = []
    for c in panel["curves"]:
        cells = []
        for k in panel["ks"]:
            p = c["points"].get(k)
            if not p or not p["lineage_train_passes"]:
                cells.append(("", False))
                continue
            ratio = f" ({p['imp_ratio']:.2f}x IMP)" if p["imp_ratio"] is not None else ""
            cells.append((f"{p['lineage_train_passes']:.3g}{ratio}", False))
        rows.append((c["label"], cells))
    return header, rows


def winning_cells(panels: list[dict]):
    columns, rows = tables.winning_table(panels)
    out = []
    for label, cells in rows:
        texts = []
        for cell in cells:
            if cell is None:
                texts.append(("", False))
            elif cell == "x":
                texts.append(("x", False))
            else:
                k, p, best = cell
                texts.append((f"{fmt_k(k)} ({p['mean']:.2f} ± {p['std']:.2f})", best))
        out.append((label, texts))
    return ["method"] + columns, out


def export_cells(panel: dict, root: Path):
    if not panel["exports"]:
        return None
    header = ["run", "k", "MAC reduction", "speedup", "latency ms (thin / dense)", "file sizes (dense / thin)"]
    rows = []
    for r in panel["exports"]:
        macs = (f"{r['macs_dense'] / r['macs_thin']:.2f}x" if number(r.get("macs_dense")) and number(r.get("macs_thin"))
                else "")
        speed = f"{r['speedup']:.2f}x" if number(r.get("speedup")) else ""
        lat = (f"{r['latency_ms']:.3g} / {r['latency_ms_dense']:.3g}"
               if number(r.get("latency_ms")) and number(r.get("latency_ms_dense")) else "")
        rows.append((str(r["path"]), [(f"{r['k']:g}", False), (macs, False), (speed, False), (lat, False),
                                      (_sizes(root / str(r["path"])), False)]))
    return header, rows


def _sizes(folder: Path) -> str:
    try:
        sizes = json.loads((folder / "export.json").read_bytes()).get("size_bytes") or {}
    except (OSError, ValueError, AttributeError):
        return ""
    return " / ".join(f"{sizes[n] / 1e6:.2f} MB" for n in ("dense", "thin") if number(sizes.get(n)) is not None)


def context(root: Path, rows: list[dict], panels: list[dict]) -> dict:
    """Everything the three files show, figures included."""
    root = Path(root)
    prov = tables.provenance(rows, root)
    prov["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    jobs = []
    for i, panel in enumerate(panels):
        selected = tables.select_layer_runs(panel)
        layers = {r["path"]: tables.read_layers(root / str(r["path"]))
                  for runs in selected.values() for _, r in runs}
        jobs.append((panel, selected, layers, f"panel{i}"))
    out = []
    for (panel, _, _, _), figs in zip(jobs, _draw_all(jobs)):
        out.append({
            "panel": panel, "results": results_cells(panel), "ratios": ratio_cells(panel),
            "exports": export_cells(panel, root), **figs,
            "dense": fmt_point(panel["dense"]) if panel["dense"]["n"] else "no done dense run",
        })
    not_done = [r for p in panels for r in p["not_done"]]
    return {"prov": prov, "panels": out, "winning": winning_cells(panels),
            "not_done": sorted({r["path"]: r for r in not_done}.values(), key=lambda r: str(r["path"])),
            "flagged": any(p["flagged"] for x in panels for c in x["curves"] for p in c["points"].values())}


def _figures(job) -> dict:
    panel, selected, layers, salt = job
    return {"fig_sparsity": figures.accuracy_vs_sparsity(panel, salt + "s"),
            "fig_compute": figures.accuracy_vs_compute(panel, salt + "c"),
            "fig_layers": figures.layer_density(selected, layers, panel["title"], salt + "l"),
            "fig_export": figures.export_speedup(panel, salt + "e")}


def _draw_all(jobs: list) -> list[dict]:
    """The figures of every panel; drawing is most of the report's time, so panels are drawn in
    parallel processes (one per core) when there are several and fork is available."""
    import multiprocessing
    import os
    workers = min(len(jobs), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [_figures(job) for job in jobs]
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_figures, jobs))


def _md_table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for label, cells in rows:
        lines.append("| " + " | ".join([label] + [f"**{t}**" if b and t else t for t, b in cells]) + " |")
    return lines


def markdown(ctx: dict) -> str:
    prov = ctx["prov"]
    lines = ["# Pruning report", "", _stamp(prov), ""]
    header, rows = ctx["winning"]
    lines += ["## Winning tickets", "",
              "The sparsest k whose mean test accuracy reaches the dense mean: `sparsity (acc ± std)`; "
              "`x`: none does. Bold: the sparsest of a column.", ""] + _md_table(header, rows) + [""]
    for p in ctx["panels"]:
        lines += [f"## {p['panel']['title']}", "", f"Dense: {p['dense']}", ""]
        if p["panel"]["curves"]:
            lines += ["Test accuracy (%), `mean ± std (n)`; bold: the best of a column; † fewer seeds than the "
                      "rest of the panel.", ""] + _md_table(*p["results"]) + [""]
        if p["ratios"]:
            lines += ["Lineage training passes (ratio to IMP's at the same k):", ""] + _md_table(*p["ratios"]) + [""]
        if p["exports"]:
            lines += ["Exported models:", ""] + _md_table(*p["exports"]) + [""]
    if ctx["not_done"]:
        lines += ["## Runs not done (not averaged)", "", "| run | status | error |", "| --- | --- | --- |"]
        lines += [f"| {r['path']} | {r.get('status')} | {str(r.get('error') or '').replace('|', '/')} |"
                  for r in ctx["not_done"]] + [""]
    return "\n".join(lines)


def _stamp(prov: dict) -> str:
    return (f"{prov['runs']} runs ({', '.join(f'{n} {s}' for s, n in prov['statuses'].items())}), "
            f"{prov['seeds']} seeds; grids: {', '.join(prov['grids']) or 'none recorded'}; "
            f"git: {', '.join(prov['shas']) or 'unknown'}; devices: {', '.join(prov['devices']) or 'unknown'}; "
            f"built {prov['date']} from {prov['root']}")


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    text = "".join(_TEX.get(ch, ch) for ch in str(text))
    return text.replace("±", r"$\pm$").replace("†", r"$^\dagger$")


def _tex_table(caption: str, header, rows) -> list[str]:
    lines = [r"\begin{table}[t]", r"\centering", r"\caption{" + _tex(caption) + "}",
             r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
    for label, cells in rows:
        texts = [r"\textbf{" + _tex(t) + "}" if b and t else _tex(t) for t, b in cells]
        lines.append(" & ".join([_tex(label)] + texts) + r" \\")
    return lines + [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]


def latex(ctx: dict) -> str:
    lines = ["% Written by python -m bip.report; needs \\usepackage{booktabs}.", f"% {_stamp(ctx['prov'])}", ""]
    lines += _tex_table("Winning tickets: the sparsest k whose mean test accuracy reaches the dense mean "
                        "(x: none does); bold: the sparsest of a column.", *ctx["winning"])
    for p in ctx["panels"]:
        if p["panel"]["curves"]:
            lines += _tex_table(f"{p['panel']['title']}: test accuracy (%), mean ± std (n); dense {p['dense']}; "
                                "bold: best of a column; † fewer seeds.", *p["results"])
    return "\n".join(lines)


def html(ctx: dict) -> str:
    try:
        import jinja2
    except ImportError:
        raise BipError("the report needs jinja2: pip install -e '.[plots]'") from None
    env = jinja2.Environment(loader=jinja2.PackageLoader("bip.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["k"] = lambda k: f"{k:g}"
    return env.get_template("report.html.j2").render(stamp=_stamp(ctx["prov"]), **ctx)
