"""Choose BiP's gamma (the paper's text does not give it): paper-variant BiP on `digits` at a
few keep ratios for several gamma values, scored on the held-out VALIDATION split.

    python benchmarks/bip_gamma.py [--root DIR] [--gammas inf 10 1 0.1 0.01] [--ks 0.1 0.03] [--seeds 1 2]

(the defaults produced the README's table: ~45 min on 2 CPU cores)

gamma scales the implicit-gradient term -(1/gamma) * M * g^2 of the score update; gamma=inf
drops it (first-order alternating scheme). Prints mean +- std best validation accuracy and
final test accuracy per (k, gamma).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bip.config import identity
from bip.config import load_config
from bip.train import train

BASE = ["data.dataset=digits", "model.arch=resnet20s", "data.batch_size=64", "data.normalize=true"]


def run(root: Path, overrides: list[str]) -> dict:
    cfg = load_config([], BASE + [f"run.result_dir={root}"] + overrides)
    return train(cfg, identity.run_dir(cfg))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--gammas", nargs="+", default=["inf", "10", "1", "0.1", "0.01"])
    p.add_argument("--ks", nargs="+", type=float, default=[0.1, 0.03])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--pretrain-epochs", type=int, default=15)
    p.add_argument("--prune-epochs", type=int, default=8)
    args = p.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="bip-gamma-"))
    rows = []
    for seed in args.seeds:
        pre = load_config([], BASE + [f"run.result_dir={root}", f"run.seed={seed}",
                                      f"train.epochs={args.pretrain_epochs}"])
        dense = train(pre, identity.run_dir(pre))
        print(f"seed {seed}: dense test {dense['test_acc']:.2f}", file=sys.stderr, flush=True)
        for k in args.ks:
            for gamma in args.gammas:
                r = run(root, [f"run.seed={seed}", "run.stage=prune", "prune.method=bip",
                               "prune.layer_type=unstructured", f"prune.k={k}",
                               "prune.score_init=magnitude", f"bip.gamma={gamma}",
                               f"train.epochs={args.prune_epochs}", f"run.parent={identity.run_id(pre)}"])
                rows.append((k, gamma, r["best_val_acc"], r["test_acc"]))
                print(f"  k {k} gamma {gamma}: best val {r['best_val_acc']:.2f} test {r['test_acc']:.2f}",
                      file=sys.stderr, flush=True)
    print(f"| k | gamma | best val acc (mean ± std, n={len(args.seeds)}) | final test acc |")
    print("|---|---|---|---|")
    for k in args.ks:
        for gamma in args.gammas:
            val = [v for kk, g, v, _ in rows if kk == k and g == gamma]
            test = [t for kk, g, _, t in rows if kk == k and g == gamma]
            sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
            print(f"| {k} | {gamma} | {statistics.mean(val):.2f} ± {sd(val):.2f} | "
                  f"{statistics.mean(test):.2f} ± {sd(test):.2f} |")
    print(f"runs under {root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
