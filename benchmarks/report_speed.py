"""How long ``python -m bip.report`` takes on a 10,000-run root: makes a fake root (index.csv,
one config.yaml per run, a mask.pt for the seed-1 runs), then times the report.

    python benchmarks/report_speed.py [--runs 10000] [--root DIR] [--keep]

Prints the seconds of the report alone (the fake root is not timed). The runs are made up:
12 panels (dataset x arch x layer type) of dense pretrains, BiP at 5 gammas, HYDRA and OMP
(prune + finetune), IMP lineages and random pruning, 10 ks and 5 seeds, until --runs rows.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KS = (0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005, 0.002)
SEEDS = (1, 2, 3, 4, 5)
COLUMNS = ("status", "stage", "method", "dataset", "arch", "layer_type", "k", "seed", "run_id", "parent_id",
           "test_acc", "kept_fraction", "collapsed", "imp_round", "lineage_train_passes", "lineage_wall_time_s",
           "device", "git_sha", "git_dirty", "error", "path", "prune.k", "bip.gamma", "run.seed")
LAYERS = [f"layer{i}.conv{j}" for i in range(1, 10) for j in (1, 2)]


def fake_runs(n: int):
    """Rows of a made-up index, in lineage order (a parent before its children)."""
    rng = random.Random(0)
    count = 0
    for dataset in ("cifar10", "cifar100", "tiny_imagenet", "svhn"):
        for arch in ("resnet18", "vgg16_bn"):
            for layer_type in ("unstructured", "filter"):
                dense_id = f"{dataset}-{arch}-{layer_type}-pretrain"
                settings = [("pretrain", "dense", {}, None, 1.0)]
                settings += [("prune", "bip", {"bip.gamma": g}, None, None) for g in (0.1, 1.0, 10.0, 100.0, "inf")]
                settings += [("prune", m, {"prune.score_init": s}, None, None)
                             for m in ("hydra", "omp") for s in ("magnitude", "kaiming_normal")]
                settings += [("finetune", m, {"prune.score_init": s}, None, None)
                             for m in ("hydra", "omp") for s in ("magnitude", "kaiming_normal")]
                settings += [("prune", "imp", {}, None, None), ("prune", "random", {}, None, None)]
                for stage, method, fields, _, _ in settings:
                    for k in ((1.0,) if stage == "pretrain" else KS):
                        tag = "-".join(f"{v}" for v in fields.values()) or "0"
                        run_id = f"{dataset}-{arch}-{layer_type}-{stage}-{method}-{tag}-{k:g}"
                        parent = {"pretrain": "", "prune": dense_id,
                                  "finetune": run_id.replace("-finetune-", "-prune-")}[stage]
                        if method == "imp" and k != KS[0]:
                            parent = run_id.rsplit("-", 1)[0] + f"-{KS[KS.index(k) - 1]:g}"
                        for seed in SEEDS:
                            if count == n:
                                return
                            count += 1
                            done = rng.random() > 0.01
                            acc = 90 - 3 * (1 - k) ** 8 * (1 + rng.random()) + rng.gauss(0, 0.3)
                            passes = 200 + (0 if stage == "pretrain" else 20 + 10 * (stage == "finetune"))
                            if method == "imp":
                                passes = 200 + 30 * (KS.index(k) + 1)
                            yield {"status": "done" if done else "failed", "stage": stage, "method": method,
                                   "dataset": dataset, "arch": arch, "layer_type": layer_type, "k": k, "seed": seed,
                                   "run_id": run_id, "parent_id": parent, "test_acc": round(acc, 2) if done else None,
                                   "kept_fraction": k, "collapsed": k < 0.005 and rng.random() < 0.2,
                                   "imp_round": KS.index(k) + 1 if method == "imp" else None,
                                   "lineage_train_passes": passes, "lineage_wall_time_s": passes * 30.0,
                                   "device": "NVIDIA H100 80GB HBM3", "git_sha": "0123456789ab", "git_dirty": False,
                                   "error": None if done else "RuntimeError: made up",
                                   "path": f"{run_id}/seed_{seed}", "prune.k": k, "run.seed": seed,
                                   "_hashed": {"run.stage": stage, "prune.method": method, "prune.k": k,
                                               "run.parent": parent or None, **fields}}


def make_root(root: Path, n: int) -> int:
    rows = list(fake_runs(n))
    try:
        import torch
    except ImportError:  # no per-layer figure then; the rest is timed all the same
        torch = None
    for row in rows:
        folder = root / row["path"]
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(json.dumps({"run_id": row["run_id"], "hashed": row.pop("_hashed")}))
        if torch is not None and row["seed"] == 1 and row["stage"] != "pretrain":
            layers = {name: {"kept_fraction": min(1.0, row["k"] * (0.5 + i / len(LAYERS)))}
                      for i, name in enumerate(LAYERS)}
            torch.save({"report": {"layers": layers}}, folder / "mask.pt")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (root / "index.csv").write_text(buffer.getvalue())
    return len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--root", type=Path, help="where to make the fake root (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the fake root")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="bip-report-speed-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        n = make_root(root, args.runs)
        from bip.report import report
        start = time.perf_counter()
        path = report(root)
        seconds = time.perf_counter() - start
        size = path.stat().st_size
        print(f"{n} runs: report in {seconds:.2f} s ({size / 1e6:.2f} MB index.html): {path}")
    finally:
        if not args.keep and args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
