"""The report page in a real browser (headless chromium, from file://, offline): every figure
drawn (the page's own self-check writes the result into the DOM), no script error on the console,
and a screenshot that is not blank. Skipped without chromium (.ci/run installs it)."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from bip.report import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")


def _chromium(*args, tmp_path):
    # its own profile folder: a shared one locks between parallel test workers
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_page_draws_every_figure_without_errors(fake_root, tmp_path):
    torch = pytest.importorskip("torch")
    # one run with a per-layer mask report (bip/train/report.py writes it into mask.pt), for the bar chart
    layers = {f"layer{i}": {"kept_fraction": 0.1 * i} for i in range(1, 6)}
    torch.save({"report": {"layers": layers}}, fake_root / "toy-net-prune-bip-0.5" / "seed_1" / "mask.pt")
    page = report(fake_root)
    html = page.read_text()
    assert html.count('<figure class="fig">') == 3  # accuracy vs sparsity, vs compute, per-layer density
    done = _chromium("--dump-dom", page.as_uri(), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    check = re.search(r'<div id="selfcheck"[^>]*>', done.stdout)
    assert check, done.stdout[-2000:]
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', check.group(0)))
    assert attrs == {"ok": "true", "figures": "3", "drawn": "3", "errors": ""}, attrs
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console

    shot = tmp_path / "page.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1400,3000", "--hide-scrollbars", page.as_uri(),
                     tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000  # a blank 1400x3000 page is a few kB
