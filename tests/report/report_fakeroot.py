"""A made-up runs root for the report tests (the fake_root fixture of conftest.py, and tests that
vary it): index.csv and config.yaml files written here, so the expected numbers are known."""
from __future__ import annotations

import csv
import json

# (stage, method, k, seed, test_acc, extra columns); accs chosen so that:
# dense mean 91; bip reaches it down to k=0.2 (its winning ticket), k=0.1 has one done seed (flagged)
# and one failed one (listed, not averaged); omp (finetuned) never reaches it (x) and one of its
# seeds collapsed; imp has lineage compute for the ratio.
RUNS = [
    ("pretrain", "dense", None, 1, 90.0, {}), ("pretrain", "dense", None, 2, 91.0, {}),
    ("pretrain", "dense", None, 3, 92.0, {}),
    ("prune", "bip", 0.5, 1, 91.5, {}), ("prune", "bip", 0.5, 2, 92.0, {}), ("prune", "bip", 0.5, 3, 91.0, {}),
    ("prune", "bip", 0.2, 1, 91.0, {}), ("prune", "bip", 0.2, 2, 91.2, {}), ("prune", "bip", 0.2, 3, 91.4, {}),
    ("prune", "bip", 0.1, 1, 85.0, {}), ("prune", "bip", 0.1, 2, None, {"status": "failed", "error": "boom"}),
    ("prune", "bip", 0.1, 3, 86.0, {}),
    ("prune", "omp", 0.5, 1, 70.0, {}), ("prune", "omp", 0.5, 2, 71.0, {}), ("prune", "omp", 0.5, 3, 72.0, {}),
    ("prune", "omp", 0.2, 1, 60.0, {}), ("prune", "omp", 0.2, 2, 61.0, {}), ("prune", "omp", 0.2, 3, 62.0, {}),
    ("finetune", "omp", 0.5, 1, 89.0, {}), ("finetune", "omp", 0.5, 2, 90.0, {}),
    ("finetune", "omp", 0.5, 3, 88.0, {}),
    ("finetune", "omp", 0.2, 1, 80.0, {}), ("finetune", "omp", 0.2, 2, 81.0, {}),
    ("finetune", "omp", 0.2, 3, 79.0, {"collapsed": True}),
    ("prune", "imp", 0.5, 1, 91.0, {}), ("prune", "imp", 0.5, 2, 90.0, {}), ("prune", "imp", 0.5, 3, 90.5, {}),
    ("prune", "imp", 0.2, 1, 89.0, {}), ("prune", "imp", 0.2, 2, 88.0, {}), ("prune", "imp", 0.2, 3, 89.5, {}),
]
COLUMNS = ("status", "stage", "method", "dataset", "arch", "layer_type", "k", "seed", "run_id", "parent_id",
           "test_acc", "kept_fraction", "collapsed", "imp_round", "lineage_train_passes", "device", "git_sha",
           "git_dirty", "error", "path", "prune.k", "run.seed")
PASSES = {"dense": 100, "bip": 120, "omp": 110, "imp": None}  # imp: 100 + 50 per round


def run_id(stage, method, k):
    return f"toy-net-{stage}-{method}" + ("" if k is None else f"-{k:g}")


def write_root(root, runs=RUNS, bip_gammas=(None,)):
    rows = []
    for gamma in bip_gammas:
        for stage, method, k, seed, acc, extra in runs:
            if gamma is not None and method != "bip":
                continue
            rid = run_id(stage, method, k) + ("" if gamma is None else f"-g{gamma:g}")
            parent = {"pretrain": "", "prune": run_id("pretrain", "dense", None),
                      "finetune": run_id("prune", method, k)}[stage]
            passes = PASSES[method]
            if method == "imp":
                round_ = {0.5: 1, 0.2: 2}[k]
                parent = parent if round_ == 1 else run_id("prune", "imp", 0.5)
                passes = 100 + 50 * round_
            row = {"status": "done", "stage": stage, "method": method, "dataset": "toy", "arch": "net",
                   "layer_type": "unstructured", "k": k, "seed": seed, "run_id": rid, "parent_id": parent,
                   "test_acc": acc, "kept_fraction": k, "collapsed": False,
                   "imp_round": round_ if method == "imp" else None, "lineage_train_passes": passes,
                   "device": "cpu", "git_sha": "abc123", "git_dirty": False, "path": f"{rid}/seed_{seed}",
                   "prune.k": k, "run.seed": seed, **extra}
            if row["status"] != "done":
                row["test_acc"] = row["lineage_train_passes"] = None
            rows.append(row)
            hashed = {"run.stage": stage, "prune.method": method, "prune.k": k, "run.parent": parent or None}
            if gamma is not None:
                hashed["bip.gamma"] = gamma
            folder = root / row["path"]
            folder.mkdir(parents=True)
            (folder / "config.yaml").write_text(json.dumps({"run_id": rid, "hashed": hashed}))
    (root / "_grids").mkdir(exist_ok=True)
    (root / "_grids" / "toygrid.json").write_text("{}")
    with open(root / "index.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return rows
