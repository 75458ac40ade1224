"""How long ``launch/grid.py --dry-run`` takes on a 10,080-cell grid over 36 pretrains (goal:
< 10 s), how many ``sbatch`` calls it plans (printed by the dry run: one array per parent up to
64 per stage, then one per parent array), and what submitting it to the local Slurm costs.

The grid: synthetic data, 6 archs x 6 seeds = 36 pretrains, x {bip, hydra} x 35 k x 4 epoch
counts = 10,080 cells -> 36 pretrains + 10,080 prunes + 5,040 hydra finetunes. The dry run
is timed as a subprocess (interpreter start and imports included), several times, median
printed; it must call sbatch zero times. With a cluster (``sinfo`` works) and ``--submit``,
the grid is then submitted held (``--hold``: nothing runs) through an ``sbatch`` shim on PATH
that counts calls, and cancelled (15,156 held jobs: about a minute on the dev cluster).

    python benchmarks/grid_dry_run.py [--repeat 5] [--submit] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
K = [0.8, 0.64, 0.512, 0.41, 0.328, 0.262, 0.2097, 0.1678, 0.1342, 0.1074, 0.0859, 0.0687, 0.055,
     0.044, 0.035, 0.028, 0.0225, 0.018, 0.0144, 0.0115, 0.0092, 0.007, 0.005, 0.003, 0.001]
K += [0.0008, 0.0006, 0.0004, 0.0002, 0.0001, 0.00008, 0.00006, 0.00004, 0.00002, 0.00001]  # 35
ARCHS = ["resnet20s", "resnet32s", "resnet44s", "resnet56s", "resnet110s", "vgg11"]
NAME = "bench10k"
GRID = f"""# 10,080 cells over 36 pretrains for benchmarks/grid_dry_run.py
name: {NAME}
profile: local
set: {{dataset: synthetic, data.synthetic_size: 256, data.batch_size: 32}}
stages:
  pretrain: {{set: {{epochs: 1}}}}
  prune: {{set: {{layer_type: unstructured}}}}
  finetune: {{methods: [hydra], set: {{epochs: 1}}}}
axes:
  seed: [1, 2, 3, 4, 5, 6]
  arch: {ARCHS}
  method: [bip, hydra]
  k: {K}
  train.epochs@prune: [1, 2, 3, 4]
"""


def grid_cmd(grid: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "grid.py"), str(grid), "--root", str(root), *extra]


def sbatch_shim(folder: Path, log: Path) -> dict:
    """An environment whose PATH starts with an ``sbatch`` that logs each call, then runs the real one."""
    real = shutil.which("sbatch")
    shim = folder / "sbatch"
    shim.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec "{real}" "$@"\n')
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


def calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.is_file() else 0


def time_dry_runs(grid: Path, root: Path, env: dict, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = subprocess.run(grid_cmd(grid, root, "--dry-run"), env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if out.returncode != 0:
            raise SystemExit(f"dry run failed: {out.stderr.strip()}")
    print(out.stdout.rstrip())
    return times


def submit_held(grid: Path, root: Path, env: dict, log: Path) -> None:
    t0 = time.perf_counter()
    out = subprocess.run(grid_cmd(grid, root, "--hold"), env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"submission failed: {out.stderr.strip()}")
    manifest = json.loads((root / "_grids" / f"{NAME}.json").read_text())
    arrays = manifest["submissions"][-1]["arrays"]
    subprocess.run(["scancel", *[a["job_id"] for a in arrays]], check=False)
    runs = sum(a["tasks"] for a in arrays)
    print(f"submission (held, then cancelled): {elapsed:.1f} s, {calls(log)} sbatch call(s), "
          f"{len(arrays)} array(s), {runs} runs: "
          + ", ".join(f"{a['stage']} {a['job_id']} x{a['tasks']}" for a in arrays))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--submit", action="store_true", help="also submit it held to the local Slurm")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temp folder)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="grid-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    grid, root, log = work / f"{NAME}.yml", work / "runs", work / "sbatch-calls.log"
    grid.write_text(GRID)
    env = sbatch_shim(work, log) if shutil.which("sbatch") else dict(os.environ)
    try:
        times = time_dry_runs(grid, root, env, args.repeat)
        print(f"dry run, 10,080 cells / 15,156 runs: median {statistics.median(times):.2f} s "
              f"(min {min(times):.2f}, max {max(times):.2f}, n={len(times)}); "
              f"sbatch calls: {calls(log)}; files written: {root.exists()}")
        cluster = shutil.which("sinfo") and subprocess.run(["sinfo"], capture_output=True).returncode == 0
        if not args.submit or not cluster:
            print("submission skipped" + ("" if not args.submit else ": no Slurm cluster (sinfo failed)"))
        else:
            submit_held(grid, root, env, log)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
