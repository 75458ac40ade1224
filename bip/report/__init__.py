"""The results report of a runs root: ``python -m bip.report ROOT`` writes ROOT/report/
index.html (one self-contained page, inline SVG figures), report.md and tables.tex (booktabs)
from ROOT/index.csv (launch/collect.py) and the run folders; nothing trains, nothing goes to
the network.

tables: grouping and statistics (pure); figures: matplotlib -> SVG; style: the one palette;
render: the three files. Imports from the rest of bip only errors and atomic.
"""
from __future__ import annotations

from pathlib import Path

from bip.rundir.atomic import write_text

REPORT_DIR = "report"
FILES = ("index.html", "report.md", "tables.tex")


def report(root, out=None) -> Path:
    """Write the three report files into ``out`` (default ROOT/report); returns index.html's path.
    Raises BipError for a missing root or index, or a missing jinja2/matplotlib/scipy."""
    from bip.report import render, tables
    root = Path(root)
    rows = tables.load(root)
    panels = tables.build(rows)
    ctx = render.context(root, rows, panels)
    out = Path(out) if out is not None else root / REPORT_DIR
    html = render.html(ctx)
    write_text(out / "report.md", render.markdown(ctx))
    write_text(out / "tables.tex", render.latex(ctx))
    write_text(out / "index.html", html)  # last: its presence means the report is complete
    return out / "index.html"
