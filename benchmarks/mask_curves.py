"""Per-epoch mask diagnostics of score-based runs, side by side (run.diagnostics=step fields).

    python benchmarks/mask_curves.py RUN_DIR[=LABEL] ... [--out FILE.png]

Reads each run folder's metrics.jsonl (bip.pruning.monitor's fields) and draws four panels
against the epoch: test accuracy, the fraction of the kept set replaced since the start mask
(mask_churn_start), the mean per-step score step ratio ||S_t - S_{t-1}|| / ||S_{t-1}||
(log), and the per-layer kept counts of the last epoch against the magnitude mask's. Prints the
same numbers as a markdown table (epochs 1, 2, 5 and the last).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(runs: dict[str, list[dict]]) -> list[str]:
    lines = ["| run | epoch | train acc | test acc | churn since start | overlap with magnitude | churn / step | score step ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for label, rows in runs.items():
        last = rows[-1]["epoch"]
        for r in rows:
            if r["epoch"] in (1, 2, 5, last):
                lines.append(f"| {label} | {r['epoch']} | {r['train_acc']:.1f} | {r['test_acc']:.1f} | "
                             f"{r.get('mask_churn_start', float('nan')):.3f} | {r.get('mask_overlap_magnitude', float('nan')):.3f} | "
                             f"{r.get('mask_churn_step', float('nan')):.4f} | {r.get('score_step_ratio', float('nan')):.3g} |")
    return lines


def summary(runs: dict[str, list[dict]], results: dict[str, dict]) -> list[str]:
    """One row per run: the first epoch's score step ratio, the last epoch's mask fields, and
    result.json's test accuracy at the best validation epoch."""
    lines = ["| run | score step ratio, epoch 1 | churn since start | overlap with magnitude | train acc | "
             "test acc at best val |", "|---|---|---|---|---|---|"]
    for label, rows in runs.items():
        first, last = rows[0], rows[-1]
        best = results[label].get("test_acc_at_best_val")
        lines.append(f"| {label} | {first.get('score_step_ratio', float('nan')):.3g} | "
                     f"{last.get('mask_churn_start', float('nan')):.3f} | {last.get('mask_overlap_magnitude', float('nan')):.3f} | "
                     f"{last['train_acc']:.1f} | {best if best is None else round(best, 1)} |")
    return lines


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), dpi=110)
    for label, rows in runs.items():
        ep = [r["epoch"] for r in rows]
        axes[0].plot(ep, [r["test_acc"] for r in rows], marker="o", ms=3, label=label)
        axes[1].plot(ep, [r.get("mask_churn_start") for r in rows], marker="o", ms=3, label=label)
        axes[2].plot(ep, [max(r.get("score_step_ratio") or 0, 1e-9) for r in rows], marker="o", ms=3, label=label)
        layers = rows[-1].get("mask_layers", {})
        axes[3].scatter([v[1] for v in layers.values()], [v[0] for v in layers.values()], s=12, label=label)
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)")
    axes[1].set(xlabel="epoch", ylabel="kept set replaced since start")
    axes[2].set(xlabel="epoch", ylabel="score step ratio (mean per step)", yscale="log")
    axes[3].set(xlabel="kept by the magnitude mask", ylabel="kept at the end", xscale="log", yscale="log")
    lim = axes[3].get_xlim()
    axes[3].plot(lim, lim, color="k", lw=0.6, ls=":")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR=LABEL (a folder with metrics.jsonl)")
    p.add_argument("--out", type=Path, default=Path("mask_curves.png"))
    p.add_argument("--summary", action="store_true", help="one row per run (no figure)")
    args = p.parse_args(argv)
    runs, results = {}, {}
    for spec in args.runs:
        path, _, label = spec.partition("=")
        label = label or Path(path).parent.name
        runs[label] = read(Path(path))
        done = Path(path) / "result.json"
        results[label] = json.loads(done.read_text()) if done.is_file() else {}
    if args.summary:
        print("\n".join(summary(runs, results)))
        return 0
    print("\n".join(table(runs)))
    plot(runs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
