"""BiP vs HYDRA, OMP, random and IMP down to 99 % sparsity, at fair budgets: accuracy and lineage
compute per method and k, read from the index.

    python benchmarks/bip_vs_imp.py [--grid configs/grids/digits_bip_vs_imp.yml] [--root DIR]
        [--jobs 2] [--no-run] [--partial] [--out docs/experiments]

Runs the grid with the real launcher (`launch/grid.py GRID --local`, which skips finished runs,
then `launch/collect.py ROOT`), reads ROOT/index.csv (only the rows of this grid's plan) and prints
one markdown table: per arm (a method, with or without prune.score_step_clip) and k, the test
accuracy at the best validation epoch of the model it ends with (`test_acc_at_best_val` of the
finetune for HYDRA / OMP / random, of the prune run for BiP and IMP), mean ± std over seeds, and
its lineage compute (`lineage_train_passes`: training-set passes of the run and its ancestors,
as the runs recorded them). Then per k the paired differences (over seeds) that the study's
claims rest on. Draws accuracy against k and against lineage compute.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FINETUNED = ("hydra", "omp", "random")  # the grid's finetune methods
CLIP = "prune.score_step_clip"
# Arms in table order: (method, fixed), label, colour, marker, line style.
ARMS = [(("bip", False), "BiP", "tab:blue", "o", "--"), (("bip", True), "BiP + clip", "tab:blue", "o", "-"),
        (("hydra", False), "HYDRA + ft", "tab:orange", "s", "--"),
        (("hydra", True), "HYDRA + clip + ft", "tab:orange", "s", "-"),
        (("omp", False), "OMP + ft", "tab:green", "^", "-"), (("random", False), "random + ft", "tab:gray", "v", "-"),
        (("imp", False), "IMP", "tab:red", "D", "-")]
PAIRS = [(("bip", True), ("bip", False)), (("hydra", True), ("hydra", False)),
         (("bip", True), ("omp", False)), (("hydra", True), ("omp", False)), (("bip", True), ("imp", False))]


def run_grid(grid: Path, root: Path, jobs: int) -> None:
    cmd = [sys.executable, str(REPO / "launch" / "grid.py"), str(grid), "--local", "--root", str(root)]
    if jobs:
        cmd += ["--jobs", str(jobs)]
    subprocess.run(cmd, check=True, cwd=REPO)
    subprocess.run([sys.executable, str(REPO / "launch" / "collect.py"), str(root)], check=True, cwd=REPO)


def load(grid: Path, root: Path, partial: bool = False):
    import pandas as pd

    sys.path.insert(0, str(REPO))
    from launch.sweep import load_grid

    plan = load_grid(grid, root)
    keys = {run.key for run in plan.all_runs()}
    df = pd.read_csv(root / "index.csv")
    df = df[[f"{r}/seed_{int(s)}" in keys for r, s in zip(df["run_id"], df["seed"])]]
    missing, not_done = len(keys) - len(df), int((df["status"] != "done").sum())
    if (missing or not_done) and not partial:
        raise SystemExit(f"error: {missing} runs of the grid missing from the index, {not_done} not done; "
                         "run without --no-run first (or --partial)")
    if missing or not_done:
        print(f"partial: {missing} runs not in the index, {not_done} not done; their cells are left out",
              file=sys.stderr)
    df = df[df["status"] == "done"].copy()
    df["fixed"] = [bool(json.loads(h).get(CLIP)) if isinstance(h, str) and h else False for h in df["hashed"]]
    return df


def final_rows(df) -> dict:
    """(method, fixed, k, seed) -> the index row of the model the arm ends with."""
    pruned = df[df["stage"] == "prune"]
    fine = df[df["stage"] == "finetune"]
    children = {(r["parent_id"], int(r["seed"])): r for _, r in fine.iterrows()}
    out = {}
    for _, r in pruned.iterrows():
        key = (r["method"], bool(r["fixed"]), float(r["k"]), int(r["seed"]))
        child = children.get((r["run_id"], int(r["seed"])))
        if child is not None:
            out[key] = child
        elif r["method"] not in FINETUNED:  # a --partial report never mixes in an unfinetuned one
            out[key] = r
    return _imp_at_requested_k(out)


def _imp_at_requested_k(out: dict) -> dict:
    """IMP is a lineage of rounds (one run each, densities (1 - rate)^r): a requested k is
    answered by the first round whose density is <= k, as the grid expands it."""
    wanted = {k for m, _, k, _ in out if m != "imp"}
    rounds = {key: r for key, r in out.items() if key[0] == "imp"}
    out = {key: r for key, r in out.items() if key[0] != "imp"}
    for k in wanted:
        for seed in {s for *_, s in rounds}:
            below = [rk for _, _, rk, s in rounds if s == seed and rk <= k * (1 + 1e-9)]
            if below:
                out[("imp", False, k, seed)] = rounds[("imp", False, max(below), seed)]
    return out


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def acc(row) -> float:
    return float(row["test_acc_at_best_val"])


def report(df) -> tuple[dict, list[str]]:
    fin = final_rows(df)
    ks = sorted({k for _, _, k, _ in fin}, reverse=True)
    seeds = sorted({s for *_, s in fin})
    dense = [float(a) for a in df[df["stage"] == "pretrain"]["test_acc_at_best_val"]]
    lines = [f"dense pretrain: {mean_sd(dense)[0]:.1f} ± {mean_sd(dense)[1]:.1f} % test accuracy at the "
             f"best validation epoch (seeds {', '.join(map(str, seeds))}); compute: lineage_train_passes "
             "(index.csv), training-set passes of the model and its ancestors", ""]
    lines += ["| method | " + " | ".join(f"k={k:g} acc % | passes" for k in ks) + " |",
              "|---" * (1 + 2 * len(ks)) + "|"]
    points = {}
    for arm, label, *_ in ARMS:
        cells = []
        for k in ks:
            rs = [fin[(*arm, k, s)] for s in seeds if (*arm, k, s) in fin]
            if not rs:
                cells.append("- | -")
                continue
            a, sd = mean_sd([acc(r) for r in rs])
            comp = statistics.mean(float(r["lineage_train_passes"]) for r in rs)
            points[(arm, k)] = (a, sd, comp)
            n = f" (n={len(rs)})" if len(rs) != len(seeds) else ""
            cells.append(f"{a:.1f} ± {sd:.1f}{n} | {comp:.0f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    labels = {arm: label for arm, label, *_ in ARMS}
    lines += ["", "Paired differences over seeds (accuracy points, mean ± std):", "",
              "| difference | " + " | ".join(f"k={k:g}" for k in ks) + " |", "|---" * (1 + len(ks)) + "|"]
    for a, b in PAIRS:
        cells = []
        for k in ks:
            both = [s for s in seeds if (*a, k, s) in fin and (*b, k, s) in fin]
            if not both:
                cells.append("-")
                continue
            d, dsd = mean_sd([acc(fin[(*a, k, s)]) - acc(fin[(*b, k, s)]) for s in both])
            cells.append(f"{d:+.1f} ± {dsd:.1f}" + (f" (n={len(both)})" if len(both) != len(seeds) else ""))
        lines.append(f"| {labels[a]} - {labels[b]} | " + " | ".join(cells) + " |")
    return points, lines


def plot(points: dict, dense_acc: float, out: Path) -> list[Path]:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, xlabel in (("sparsity", "kept fraction k (log)"), ("compute", "lineage training passes (log)")):
        fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=110)
        for arm, label, color, marker, ls in ARMS:
            pts = sorted((k, *v) for (a, k), v in points.items() if a == arm)
            if not pts:
                continue
            xs = [p[0] if name == "sparsity" else p[3] for p in pts]
            ax.errorbar(xs, [p[1] for p in pts], yerr=[p[2] for p in pts], color=color, marker=marker,
                        ms=4, lw=1, ls=ls, capsize=2, label=label, mfc="none" if ls == "--" else color)
        ax.axhline(dense_acc, color="k", ls=":", lw=1, label="dense")
        ax.set_xscale("log")
        if name == "sparsity":
            ax.invert_xaxis()
            ticks = sorted({k for _, k in points})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy at best val. (%)")
        ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"bip_vs_imp_{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", type=Path, default=REPO / "configs" / "grids" / "digits_bip_vs_imp.yml")
    p.add_argument("--root", type=Path, default=None, help="run root (default: the grid's root:)")
    p.add_argument("--jobs", type=int, default=0, help="launch/grid.py --jobs (0: its default)")
    p.add_argument("--no-run", action="store_true", help="only read the index (runs must be done)")
    p.add_argument("--partial", action="store_true", help="report the finished runs of an unfinished grid")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "experiments", help="folder for the two PNGs")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from launch.sweep import load_grid

    root = Path(args.root if args.root is not None else load_grid(args.grid).root).resolve()
    if not args.no_run:
        run_grid(args.grid, root, args.jobs)
    if args.partial:
        subprocess.run([sys.executable, str(REPO / "launch" / "collect.py"), str(root)], check=True, cwd=REPO)
    df = load(args.grid, root, args.partial)
    points, lines = report(df)
    print("\n".join(lines))
    dense_acc = float(df[df["stage"] == "pretrain"]["test_acc_at_best_val"].mean())
    for path in plot(points, dense_acc, args.out):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
