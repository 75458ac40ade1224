"""benchmarks/gpu_check.py runs end to end on a CPU (--quick: tiny sizes, figures meaningless)
without submitit and ffcv, as on the bare GPU machine, and a part that runs out of time is
killed and reported while the table is still written."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def gpu_check(tmp_path, *args, timeout=600):
    # As on the GPU machine: neither submitit nor ffcv can be imported (in every process).
    block = tmp_path / "block"
    block.mkdir(exist_ok=True)
    (block / "sitecustomize.py").write_text("import sys\nsys.modules.update(submitit=None, ffcv=None)\n")
    env = {**os.environ, "PYTHONPATH": f"{block}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "check.md"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--out", str(out),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"] if out.with_suffix(".json").is_file() else []
    return proc, out, rows


@pytest.mark.slow
def test_quick_run_covers_every_part_without_submitit_or_ffcv(tmp_path):
    proc, out, rows = gpu_check(tmp_path, "--quick")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("### GPU check: ") and text in proc.stdout  # ONE table, printed last
    assert {"env", "syncs", "tests", "step_cost", "cifar_epoch", "imagenet", "invariance",
            "compile"} <= {r["part"] for r in rows}
    assert [r for r in rows if r["ok"] is False] == []
    assert "submitit not installed" in text and "ffcv not installed" in text
    syncs = [r for r in rows if r["part"] == "syncs"]
    assert len(syncs) == 6 and all(r["ok"] for r in syncs)  # loader + 5 methods, 0 syncs each
    graphs = [r for r in rows if r["check"].startswith("graphs compiled")]
    assert len(graphs) == 3 and all(r["result"].endswith(", 0 after") for r in graphs)
    assert (out.parent / "check_logs" / "syncs.log").is_file()
    suite = [r for r in rows if r["check"] == "pytest tests/distributed/test_invariance.py"]  # make test runs it
    assert len(suite) == 1 and re.match(r"\d+ tests collected .*\(--quick: collected, not run\)", suite[0]["result"])


@pytest.mark.slow
def test_a_part_out_of_time_is_killed_and_reported(tmp_path):
    # Full sizes on a CPU: ResNet-18 step costs take minutes; the budget leaves the part ~20 s.
    proc, out, rows = gpu_check(tmp_path, "--parts", "step_cost", "--budget", "24")
    assert proc.returncode == 1
    failed = [r for r in rows if r["ok"] is False]
    assert len(failed) == 1 and failed[0]["part"] == "step_cost"
    assert re.match(r"timed out after 2\d s \(log: check_logs/step_cost.log\)", failed[0]["result"])
    assert out.read_text() in proc.stdout
