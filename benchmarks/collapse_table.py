"""Layer collapse at extreme sparsity on `digits`: which settings prevent it, and at what cost.

    python benchmarks/collapse_table.py [--root DIR] [--ks 0.05 0.02 0.01] [--seeds 1234]
        [--pretrain-epochs 15] [--prune-epochs 1] [--floor 10] [--jobs 2]
        [--methods hydra "bip (paper)" "bip (reference)"] [--finetune-epochs 0]

README's tables ("Layer collapse on digits, measured"), same --root for both so they share the
pretrain (~20 min on 2 busy cores):

    python benchmarks/collapse_table.py --root R
    python benchmarks/collapse_table.py --root R --ks 0.02 --prune-epochs 3 --finetune-epochs 1 \
        --methods hydra "bip (paper)"

One dense pretrain per seed (the seed README's preset `configs/CIFAR10/pretrain.yml` with
`--dataset digits --batch-size 64 --epochs 15`: the same run as that command line, so an existing
run folder under --root is reused), then unstructured pruning from it with the presets
`configs/CIFAR10/hydra.yml` (HYDRA) and `configs/CIFAR10/bip.yml` (BiP, `bip.variant=paper`
and `bip.variant=reference`), `--scaled-score-init` as the presets say, at each k, under four
protection settings:

    none    nothing (global top-k over every conv and linear weight)
    floor   prune.min_layer_keep=FLOOR (a count >= 1, or a fraction < 1 of each layer)
    skip    prune.skip=first,classifier (conv1 and fc dense; k counts the other layers)
    both    floor and skip

Prints one markdown table: per (method, setting, k) the test accuracy after the prune stage
(with --finetune-epochs N, also after a finetune of every prune run: `-> ft`), whether the network ended disconnected (`collapsed` in result.json), the first epoch
whose record says so, the layers left empty, and the kept fraction of ALL conv/linear weights
(skipped layers included, so `skip` keeps a little more than k). Runs are ordinary run folders:
rerunning the script reuses finished ones and prints the same table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "configs" / "CIFAR10"
METHODS = {  # label -> (preset, overrides)
    "hydra": ("hydra.yml", []),
    "bip (paper)": ("bip.yml", ["bip.variant=paper"]),
    "bip (reference)": ("bip.yml", ["bip.variant=reference"]),
}


def settings(floor: str) -> dict[str, list[str]]:
    return {"none": [], f"floor={floor}": [f"prune.min_layer_keep={floor}"],
            "skip=first,classifier": ["prune.skip=first,classifier"],
            f"floor={floor} + skip": [f"prune.min_layer_keep={floor}", "prune.skip=first,classifier"]}


def common(root: Path, seed: int) -> list[str]:
    return ["data.dataset=digits", "data.batch_size=64", "data.num_workers=0",
            f"run.result_dir={root}", f"run.seed={seed}"]


def _train(job: tuple[list[str], list[str]]) -> dict:
    """One run in a worker process (1 torch thread: the machine is shared)."""
    import torch

    from bip.config import identity
    from bip.config import load_config
    from bip.errors import BipError
    from bip.train import train

    torch.set_num_threads(1)
    files, overrides = job
    try:
        cfg = load_config(files, overrides)
        run_dir = identity.run_dir(cfg)
        result = train(cfg, run_dir)
    except BipError as err:  # e.g. a floor larger than the budget: a cell of the table
        return {"error": str(err)}
    first = None
    metrics = Path(run_dir) / identity.METRICS
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if row.get("collapsed") and first is None:
                first = row.get("epoch")
    return {**result, "first_collapsed_epoch": first}


def pretrain_job(root: Path, seed: int, epochs: int) -> tuple[list[str], list[str]]:
    return [str(PRESETS / "pretrain.yml")], common(root, seed) + [f"train.epochs={epochs}"]


def prune_jobs(root: Path, seed: int, parent: str, ks, epochs: int, floor: str, methods):
    for method, (preset, extra) in METHODS.items():
        if method not in methods:
            continue
        for setting, protect in settings(floor).items():
            for k in ks:
                yield (method, setting, k, seed), (
                    [str(PRESETS / preset)],
                    common(root, seed) + extra + protect + [
                        "prune.layer_type=unstructured", f"prune.k={k}", f"train.epochs={epochs}",
                        f"run.parent={parent}"])


def finetune_job(root: Path, seed: int, prune_overrides: list[str], parent: str, epochs: int):
    """Finetune of a prune run: same layer type, k and protection settings (the mask is fixed)."""
    keep = [o for o in prune_overrides if o.startswith(("prune.k=", "prune.layer_type=", "prune.skip=",
                                                         "prune.min_layer_keep="))]
    return [str(PRESETS / "finetune.yml")], common(root, seed) + keep + [
        f"train.epochs={epochs}", "optim.lr=0.01", f"run.parent={parent}"]


def cell(r: dict) -> str:
    if "error" in r:
        return "error: " + r["error"].split(": ", 1)[-1][:60]
    acc = f"{r['test_acc']:.1f}"
    if r.get("collapsed"):
        return f"**{acc} collapsed (ep {r['first_collapsed_epoch']})**"
    empty = r.get("collapsed_layers") or []
    return acc + (f" ({len(empty)} empty)" if empty else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--ks", nargs="+", type=float, default=[0.05, 0.02, 0.01])
    p.add_argument("--seeds", nargs="+", type=int, default=[1234])
    p.add_argument("--pretrain-epochs", type=int, default=15)
    p.add_argument("--prune-epochs", type=int, default=1)
    p.add_argument("--floor", default="10", help="prune.min_layer_keep of the floor settings")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="also finetune every prune run (configs/CIFAR10/finetune.yml, lr 0.01)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = (args.root or Path(tempfile.mkdtemp(prefix="bip-collapse-"))).resolve()
    sys.path.insert(0, str(REPO))
    from bip.config import identity
    from bip.config import load_config

    results, finetuned, dense = {}, {}, {}
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        for seed in args.seeds:
            files, over = pretrain_job(root, seed, args.pretrain_epochs)
            dense[seed] = pool.submit(_train, (files, over)).result()
            print(f"seed {seed}: dense test {dense[seed]['test_acc']:.2f}", file=sys.stderr, flush=True)
            parent = identity.run_id(load_config(files, over))
            jobs = dict(prune_jobs(root, seed, parent, args.ks, args.prune_epochs, args.floor,
                                   args.methods))
            futures = {key: pool.submit(_train, job) for key, job in jobs.items()}
            tuned = {}
            for key, fut in futures.items():
                results[key] = fut.result()
                print(f"  {key}: {cell(results[key])}", file=sys.stderr, flush=True)
                if args.finetune_epochs and "error" not in results[key]:
                    tuned[key] = pool.submit(_train, finetune_job(root, seed, jobs[key][1],
                                                                  results[key]["run_id"], args.finetune_epochs))
            for key, fut in tuned.items():
                finetuned[key] = fut.result()
                print(f"  {key} finetuned: {cell(finetuned[key])}", file=sys.stderr, flush=True)

    for seed in args.seeds:
        ft = (f"then finetune {args.finetune_epochs} epochs at lr 0.01 (-> ft)" if args.finetune_epochs
              else "no finetune")
        print(f"\nseed {seed}: dense pretrain {args.pretrain_epochs} epochs, test acc "
              f"{dense[seed]['test_acc']:.1f}%; prune {args.prune_epochs} epochs, {ft}. "
              f"Cells: test acc % after the prune stage; kept = fraction of all conv/linear weights kept.\n")
        print("| method | setting | " + " | ".join(f"k = {k}" for k in args.ks) + " | kept (at each k) |")
        print("|---|---|" + "---|" * len(args.ks) + "---|")
        for method in args.methods:
            for setting in settings(args.floor):
                rs = [results[(method, setting, k, seed)] for k in args.ks]
                kept = " / ".join(f"{r['sparsity']['weight_kept_fraction']:.4f}" if "sparsity" in r else "-"
                                  for r in rs)
                cells = [cell(r) for r in rs]
                if args.finetune_epochs:
                    cells = [c + (f" -> ft {finetuned[(method, setting, k, seed)]['test_acc']:.1f}"
                                  if (method, setting, k, seed) in finetuned else "")
                             for c, k in zip(cells, args.ks)]
                print(f"| {method} | {setting} | " + " | ".join(cells) + f" | {kept} |")
        empty = {(m, s, k): r.get("collapsed_layers") for (m, s, k, sd), r in results.items()
                 if sd == seed and r.get("collapsed")}
        if empty:
            print("\nlayers with 0 kept weights in the collapsed runs:")
            for (m, s, k), layers in empty.items():
                print(f"- {m}, {s}, k = {k}: {', '.join(layers) or 'none (cut elsewhere)'}")
    print(f"runs under {root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
