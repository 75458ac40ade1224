"""bip.report's numbers on a made-up root (tests/report/conftest.py): grouping by method setting,
mean/std/n against the statistics module, bootstrap intervals, winning tickets (one that exists,
one that does not), the 1-seed flag, not-done runs listed and not averaged, collapsed runs, the
compute ratio to IMP, and the three files with the same cells."""
from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bip.report import render, report, tables

REPO = Path(__file__).resolve().parents[2]


def _panel(root):
    panels = tables.build(tables.load(root))
    assert [p["title"] for p in panels] == ["toy / net / unstructured"]
    return panels[0]


def _curve(panel, method):
    (curve,) = [c for c in panel["curves"] if c["method"] == method]
    return curve


def test_means_stds_and_n_match_statistics(fake_root):
    panel = _panel(fake_root)
    dense = panel["dense"]
    assert dense["n"] == 3
    assert dense["mean"] == pytest.approx(statistics.fmean([90.0, 91.0, 92.0]))
    assert dense["std"] == pytest.approx(statistics.stdev([90.0, 91.0, 92.0]))
    bip = _curve(panel, "bip")
    assert list(bip["points"]) == [0.5, 0.2, 0.1]  # k descending
    p = bip["points"][0.2]
    assert (p["n"], p["seeds"]) == (3, [1, 2, 3])
    assert p["mean"] == pytest.approx(statistics.fmean([91.0, 91.2, 91.4]))
    assert p["std"] == pytest.approx(statistics.stdev([91.0, 91.2, 91.4]))
    lo, hi = p["ci"]
    assert lo <= p["mean"] <= hi and 91.0 - 1e-9 <= lo < hi <= 91.4 + 1e-9  # within the sample's range
    assert tables.bootstrap_ci([91.0, 91.2, 91.4]) == (lo, hi)  # fixed seed: the same every build


def test_stage_and_labels(fake_root):
    panel = _panel(fake_root)
    # a point uses its finetune runs when it has any: omp's finetuned accuracies, not its prune ones
    omp = _curve(panel, "omp")
    assert omp["stage"] == "finetune" and omp["label"] == "omp (after finetune)"
    assert omp["points"][0.5]["mean"] == pytest.approx(statistics.fmean([89.0, 90.0, 88.0]))
    assert _curve(panel, "bip")["label"] == "bip (as pruned)"


def test_not_done_listed_not_averaged_and_one_seed_flagged(fake_root):
    panel = _panel(fake_root)
    p = _curve(panel, "bip")["points"][0.1]
    # seed 2 failed: the mean is over the done seeds only, and the point has fewer seeds than the rest
    assert p["n"] == 2 and p["mean"] == pytest.approx(statistics.fmean([85.0, 86.0]))
    assert [r["path"] for r in p["not_done"]] == ["toy-net-prune-bip-0.1/seed_2"]
    assert p["flagged"] and p["ci"] is None  # no bootstrap band under 3 seeds
    assert not _curve(panel, "bip")["points"][0.2]["flagged"]
    assert [r["path"] for r in panel["not_done"]] == ["toy-net-prune-bip-0.1/seed_2"]
    assert tables.fmt_point(p) == "85.50 ± 0.71 (2)†"


def test_one_seed_point_has_std_zero(tmp_path):
    from report_fakeroot import RUNS, write_root
    root = tmp_path / "runs"
    root.mkdir()
    write_root(root, [r for r in RUNS if not (r[1] == "bip" and r[2] == 0.1 and r[3] == 3)])
    p = _curve(_panel(root), "bip")["points"][0.1]
    assert (p["n"], p["std"], p["flagged"]) == (1, 0.0, True)
    assert tables.fmt_point(p) == "85.00 ± 0.00 (1)†"


def test_winning_tickets(fake_root):
    panel = _panel(fake_root)
    # bip: k=0.5 (91.5) and k=0.2 (91.2) reach the dense mean 91; k=0.1 (85.5) does not
    assert _curve(panel, "bip")["winning"] == 0.2
    assert _curve(panel, "omp")["winning"] is None
    header, rows = render.winning_cells([panel])
    cells = dict(rows)
    assert header == ["method", "toy / net / unstructured"]
    assert cells["bip (as pruned)"] == [("80% (91.20 ± 0.20)", True)]  # the sparsest: bold
    assert cells["omp (after finetune)"] == [("x", False)]
    assert cells["imp (as pruned)"] == [("x", False)]  # 90.50 at k=0.5: below the dense 91


def test_collapsed_and_compute_ratio(fake_root):
    panel = _panel(fake_root)
    assert _curve(panel, "omp")["points"][0.2]["collapsed"] == 1
    assert panel["collapsed_runs"] == 1
    imp = _curve(panel, "imp")
    # an IMP round's parent is the round before: both rounds are one curve
    assert list(imp["points"]) == [0.5, 0.2]
    assert imp["points"][0.2]["lineage_train_passes"] == 200
    bip = _curve(panel, "bip")
    assert bip["points"][0.5]["imp_ratio"] == pytest.approx(120 / 150)
    assert bip["points"][0.2]["imp_ratio"] == pytest.approx(120 / 200)


def test_settings_split_curves(tmp_path):
    from report_fakeroot import write_root
    root = tmp_path / "runs"
    root.mkdir()
    write_root(root, bip_gammas=(1.0, 10.0))
    labels = [c["label"] for c in _panel(root)["curves"]]
    assert labels == ["bip (bip.gamma=1.0, as pruned)", "bip (bip.gamma=10.0, as pruned)"]


def test_results_table_in_all_three_files(fake_root):
    path = report(fake_root)
    assert path == fake_root / "report" / "index.html"
    md = (fake_root / "report" / "report.md").read_text()
    tex = (fake_root / "report" / "tables.tex").read_text()
    html = path.read_text()
    header, rows = render.results_cells(_panel(fake_root))
    assert header == ["method", "50% (k=0.5)", "80% (k=0.2)", "90% (k=0.1)"]
    bip = dict(rows)["bip (as pruned)"]
    assert bip[0] == ("91.50 ± 0.50 (3)", True)  # the best mean at k=0.5
    assert "| bip (as pruned) | **91.50 ± 0.50 (3)** | **91.20 ± 0.20 (3)** | **85.50 ± 0.71 (2)†** |" in md
    assert r"bip (as pruned) & \textbf{91.50 $\pm$ 0.50 (3)} & \textbf{91.20 $\pm$ 0.20 (3)}" in tex
    assert r"\toprule" in tex and r"\bottomrule" in tex
    assert "91.50 ± 0.50 (3)" in html and "toy-net-prune-bip-0.1/seed_2" in html
    assert "abc123" in html and "toygrid" in html and "30 runs" in html
    # self-contained: nothing the page would fetch
    # (SVG namespace URIs are names, never fetched)
    for fetches in ('src="http', "href=\"http", "url(http", "@import", "<link", "<script src"):
        assert fetches not in html


def test_bad_input_is_one_line(tmp_path):
    for args, message in (([str(tmp_path / "nope")], "is not a directory"), ([str(tmp_path)], "cannot read")):
        done = subprocess.run([sys.executable, "-m", "bip.report", *args], capture_output=True, text=True,
                              cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and message in done.stderr and "Traceback" not in done.stderr
