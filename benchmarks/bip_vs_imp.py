"""BiP vs IMP (and HYDRA, OMP) at high sparsity: test accuracy against sparsity and against the
compute of each model's whole lineage.

    python benchmarks/bip_vs_imp.py [--grid configs/grids/digits_bip_vs_imp.yml] [--root DIR]
        [--jobs 2] [--no-run] [--partial] [--out docs]

Runs the grid with the real launcher (`launch/grid.py GRID --local`, which skips finished runs,
then `launch/collect.py ROOT`), reads ROOT/index.csv (only the rows of this grid's plan), and
prints one markdown table per k: per method the final test accuracy (mean ± std over seeds; the
finetuned model for HYDRA and OMP, the pruned model for BiP and IMP) and the lineage compute;
then, per k, the compute ratio IMP / BiP and the paired accuracy difference IMP - BiP (mean ±
std over seeds), each also after recomputing the final model's BatchNorm statistics
(`recalibrated_acc`; in parentheses, dashed curves). Draws `bip_vs_imp_sparsity.png` (accuracy vs kept fraction) and
`bip_vs_imp_compute.png` (accuracy vs lineage compute, log x), one point per (method, k).

Compute is in training-set passes (one forward + one backward over every training example).
When the index has `lineage_train_passes` (the compute accounting columns) that column is used
(`--units` says which). Otherwise it is counted here from what the runs record, and only that:
a run's passes = its trained epochs (`epochs` in result.json; IMP: rounds x epochs per round) x
the passes per epoch of its method (pretrain, HYDRA, IMP, finetune: 1; BiP paper variant: 2,
since each step trains on one batch of each of two independent streams over the training split,
forward + backward on both; OMP: 0), summed over the run and its ancestors (`parent_id`).
Evaluation passes (validation / test every epoch) are not counted, for any method.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("bip", "hydra", "omp", "imp")
FINETUNED = ("hydra", "omp")  # the grid's finetune methods
PASSES_PER_EPOCH = {"dense": 1, "hydra": 1, "imp": 1, "omp": 0, "random": 0}
STYLE = {"bip": ("tab:blue", "o"), "hydra": ("tab:orange", "s"), "omp": ("tab:green", "^"),
         "imp": ("tab:red", "D")}


def passes_per_epoch(row) -> float:
    if row["stage"] in ("pretrain", "finetune"):
        return 1.0
    if row["method"] == "bip":
        if str(row.get("bip.variant", "paper")) != "paper":
            raise SystemExit("error: this count covers BiP's paper variant only")
        return 2.0
    return float(PASSES_PER_EPOCH[row["method"]])


def lineage_passes(df) -> dict:
    """(run_id, seed) -> passes of the run and all its ancestors (counted, see the docstring)."""
    rows = {(r["run_id"], int(r["seed"])): r for _, r in df.iterrows()}
    own = {key: float(r["epochs"]) * passes_per_epoch(r) for key, r in rows.items()}
    out = {}
    for key, r in rows.items():
        total, cur = 0.0, r
        while True:
            total += own[(cur["run_id"], int(cur["seed"]))]
            parent = cur["parent_id"]
            if not isinstance(parent, str) or not parent:
                break
            cur = rows[(parent, int(cur["seed"]))]
        out[key] = total
    return out


def recalibrated_acc(run_dir: Path) -> float:
    """Test accuracy (eval mode) of a run's published final model after recomputing its
    BatchNorm running statistics: reset, then one pass over the training split in train mode with
    a cumulative average (momentum None), no weight or mask changes. Runs whose weights move
    fast for one or two epochs (lr 0.1, or every IMP round restarting from the dense weights and
    statistics) can end with running statistics that no longer describe the sparse network; this
    separates that from what the mask and weights are worth."""
    import torch

    from bip.rundir import checkpoint
    from bip.config import build_config
    from bip.data import load_dataset
    from bip.data.loaders import build_loaders
    from bip.models import create_model, model_options
    from bip.train.sources import model_input

    doc = json.loads((run_dir / "config.yaml").read_text())
    cfg = build_config([(f"{sec}.{key}", value, str(run_dir)) for sec, fields in doc["config"].items()
                        for key, value in fields.items()])
    spec = model_input(cfg, load_dataset(cfg.data, cfg.model.num_classes))
    model = create_model(cfg.model.arch, spec.num_classes, cfg.prune.layer_type, **model_options(cfg.model))
    model.load_state_dict(checkpoint.source_state(run_dir / "final.pt")[0])
    loaders = build_loaders(cfg.data, spec, seed=cfg.run.seed, streams=1, rank=0, world=1,
                            device=torch.device("cpu"))
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for x, _ in loaders.streams[0].epoch(0):
            model(x)
        model.eval()
        correct = total = 0
        for x, y in loaders.test():
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


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
    missing = len(keys) - len(df)
    not_done = df[df["status"] != "done"]
    if (missing or len(not_done)) and not partial:
        raise SystemExit(f"error: {missing} runs of the grid missing from the index, "
                         f"{len(not_done)} not done; run without --no-run first (or --partial)")
    if missing or len(not_done):
        print(f"partial: {missing} runs not in the index, {len(not_done)} not done; "
              "their cells are left out", file=sys.stderr)
    df = df[df["status"] == "done"].copy()
    df["collapsed"] = [bool(json.loads((root / p / "result.json").read_text()).get("collapsed"))
                       for p in df["path"]]
    if "lineage_train_passes" in df.columns and df["lineage_train_passes"].notna().all():
        passes, units = dict(zip(zip(df["run_id"], df["seed"].astype(int)), df["lineage_train_passes"])), \
            "lineage_train_passes (index.csv)"
    else:
        passes, units = lineage_passes(df), "training-set passes, counted by this script"
    df["lineage"] = [passes[(r, int(s))] for r, s in zip(df["run_id"], df["seed"])]
    final = (df["stage"] == "finetune") | ((df["stage"] == "prune") & ~df["method"].isin(FINETUNED))
    df["recal_acc"] = [recalibrated_acc(root / p) if f else float("nan") for p, f in zip(df["path"], final)]
    return df, units


def final_rows(df):
    """The model each (method, k, seed) ends with: its finetune when it has one, else its prune."""
    pruned = df[df["stage"] == "prune"]
    fine = df[df["stage"] == "finetune"].set_index("parent_id")
    out = {}
    for _, r in pruned.iterrows():
        key = (r["method"], float(r["k"]), int(r["seed"]))
        child = fine[(fine.index == r["run_id"]) & (fine["seed"] == r["seed"])]
        if len(child):
            out[key] = child.iloc[0]
        elif r["method"] not in FINETUNED:  # a --partial report never mixes in an unfinetuned one
            out[key] = r
    return _imp_at_requested_k(out)


def _imp_at_requested_k(out: dict) -> dict:
    """IMP is a lineage of rounds (one run each, densities (1 - rate)^r): a requested k is
    answered by the first round whose density is <= k, as the grid expands it."""
    wanted = {k for m, k, _ in out if m != "imp"}
    rounds = {key: r for key, r in out.items() if key[0] == "imp"}
    out = {key: r for key, r in out.items() if key[0] != "imp"}
    for k in wanted:
        for seed in {s for _, _, s in rounds}:
            below = [rk for _, rk, s in rounds if s == seed and rk <= k * (1 + 1e-9)]
            if below:
                out[("imp", k, seed)] = rounds[("imp", max(below), seed)]
    return out


def mean_sd(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def report(df, units: str) -> tuple[dict, list[str]]:
    fin = final_rows(df)
    ks = sorted({k for _, k, _ in fin}, reverse=True)
    seeds = sorted({s for _, _, s in fin})
    dense = df[df["stage"] == "pretrain"]
    lines = [f"dense pretrain: test acc {mean_sd(list(dense['test_acc']))[0]:.1f} ± "
             f"{mean_sd(list(dense['test_acc']))[1]:.1f} % (seeds {seeds}); compute: {units}", ""]
    head = "| k | " + " | ".join(f"{m} acc % (BN recal.) | {m} passes" for m in METHODS) + \
           " | IMP / BiP compute | IMP - BiP acc (pp) | same, BN recal. |"
    lines += [head, "|---" * (2 * len(METHODS) + 3) + "|"]
    points = {}
    for k in ks:
        cells = []
        for m in METHODS:
            rs = [fin[(m, k, s)] for s in seeds if (m, k, s) in fin]
            if not rs:
                cells.append("- | -")
                continue
            acc, sd = mean_sd([float(r["test_acc"]) for r in rs])
            rec, rsd = mean_sd([float(r["recal_acc"]) for r in rs])
            comp = statistics.mean(float(r["lineage"]) for r in rs)
            cut = sum(bool(r["collapsed"]) for r in rs)
            points[(m, k)] = (acc, sd, comp, cut, rec, rsd)
            n = f", n={len(rs)}" if len(rs) != len(seeds) else ""
            cells.append(f"{acc:.1f} ± {sd:.1f} ({rec:.1f} ± {rsd:.1f}){n}"
                         + (f" ({cut} collapsed)" if cut else "") + f" | {comp:.0f}")
        both = [s for s in seeds if ("imp", k, s) in fin and ("bip", k, s) in fin]
        if not both:
            lines.append(f"| {k} | " + " | ".join(cells) + " | - | - | - |")
            continue
        ratio = points[("imp", k)][2] / points[("bip", k)][2]
        d, dsd = mean_sd([float(fin[("imp", k, s)]["test_acc"]) - float(fin[("bip", k, s)]["test_acc"])
                          for s in both])
        e, esd = mean_sd([float(fin[("imp", k, s)]["recal_acc"]) - float(fin[("bip", k, s)]["recal_acc"])
                          for s in both])
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {ratio:.2f}x | {d:+.1f} ± {dsd:.1f}"
                     + (f" (n={len(both)})" if len(both) != len(seeds) else "") + f" | {e:+.1f} ± {esd:.1f} |")
    return points, lines


def plot(points: dict, dense_acc: float, units: str, out: Path) -> list[Path]:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, xkey, xlabel in (("sparsity", "k", "kept fraction k (log)"),
                               ("compute", "c", f"lineage compute ({units.split(',')[0]}, log)")):
        fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=110)
        for m in METHODS:
            pts = sorted((k, *v) for (mm, k), v in points.items() if mm == m)
            if not pts:
                continue
            xs = [p[0] if xkey == "k" else p[3] for p in pts]
            color, marker = STYLE[m]
            ax.errorbar(xs, [p[1] for p in pts], yerr=[p[2] for p in pts], color=color, marker=marker,
                        ms=4, lw=1, capsize=2, label=m + (" (+finetune)" if m in ("hydra", "omp") else ""))
            ax.plot(xs, [p[5] for p in pts], color=color, marker=marker, ms=4, lw=0.8, ls="--",
                    mfc="none", label=f"{m}, BN recalibrated")
            for x, p in zip(xs, pts):
                if p[4]:  # collapsed in at least one seed
                    ax.scatter([x], [p[1]], s=80, facecolors="none", edgecolors="k", zorder=5)
                if xkey == "c":
                    ax.annotate(f"{p[0]:g}", (x, p[1]), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.axhline(dense_acc, color="gray", ls=":", lw=1, label="dense")
        ax.set_xscale("log")
        if xkey == "k":
            ax.invert_xaxis()
        # Label the values themselves: a log axis over less than a decade has no labelled ticks.
        ticks = sorted({round(k if xkey == "k" else v[2], 3) for (_, k), v in points.items()})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
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
    p.add_argument("--out", type=Path, default=REPO / "docs", help="folder for the two PNGs")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from launch.sweep import load_grid

    root = args.root if args.root is not None else load_grid(args.grid).root
    root = Path(root).resolve()
    if not args.no_run:
        run_grid(args.grid, root, args.jobs)
    if args.partial:
        subprocess.run([sys.executable, str(REPO / "launch" / "collect.py"), str(root)], check=True, cwd=REPO)
    df, units = load(args.grid, root, args.partial)
    points, lines = report(df, units)
    print("\n".join(lines))
    dense_acc = float(df[df["stage"] == "pretrain"]["test_acc"].mean())
    for path in plot(points, dense_acc, units, args.out):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
