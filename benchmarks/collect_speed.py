"""How long ``launch.collect`` takes on a large results tree (goal: <= 5 s for 10,000 runs).

Generates synthetic run folders shaped like the trainer's (config.yaml with the full config and
provenance, result.json, metrics.jsonl, an empty checkpoint.pt, error.json), with a realistic
mix of statuses, then times ``python launch/collect.py ROOT`` in fresh processes (the figure
the goal is about: imports and a cold parse memo included) and ``collect()`` called again in
this process, and prints the medians. CPU seconds are printed too: wall time on a shared
machine also measures the neighbours.

    python benchmarks/collect_speed.py [--runs 10000] [--repeat 5] [--plots] [--root DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `launch` from a checkout

from bip.config import identity  # noqa: E402
from bip.config import Config  # noqa: E402
from launch import collect  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "launch" / "collect.py"

DATASETS, ARCHS = ("CIFAR10", "CIFAR100"), ("resnet20s", "vgg16_bn")
LAYER_TYPES, METHODS = ("unstructured", "filter"), ("bip", "hydra", "omp", "imp", "random")
KS = (0.8, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01)
# Status shares of a sweep in progress: mostly done, a few of everything else.
STATUS_MIX = {"done": 0.88, "running": 0.04, "failed": 0.02, "pending": 0.05, "corrupt": 0.01}


def configs():
    """Configs of a grid's pretrain, prune and finetune stages, seed-major, without end."""
    for seed in itertools.count(1):
        for dataset, arch in itertools.product(DATASETS, ARCHS):
            dense = Config().replace(**{"data.dataset": dataset, "model.arch": arch, "run.seed": seed,
                                        "train.epochs": 160, "run.result_dir": "runs"})
            yield dense
            for layer_type, method, k in itertools.product(LAYER_TYPES, METHODS, KS):
                prune = dense.replace(**{"run.stage": "prune", "prune.method": method,
                                         "prune.layer_type": layer_type, "prune.k": k,
                                         "run.parent": identity.run_id(dense), "train.epochs": 100})
                yield prune
                if method != "bip":
                    yield prune.replace(**{"run.stage": "finetune", "run.parent": identity.run_id(prune)})


def write_run(root: Path, cfg: Config, status: str, rng: random.Random, epochs: int) -> None:
    folder = identity.run_dir(cfg, root)
    folder.mkdir(parents=True, exist_ok=True)
    provenance = {"git_sha": "%040x" % rng.getrandbits(160), "git_dirty": False, "python": "3.11.7",
                  "torch": "2.4.1+cu121", "torchvision": "0.19.1+cu121", "accelerate": "1.0.1",
                  "cuda": "12.1", "device": "NVIDIA A100-SXM4-80GB", "world_size": 1,
                  "host": f"gpu{rng.randrange(100):03d}", "slurm_restart_count": 0,
                  "slurm_job_id": f"{rng.randrange(10**6)}_{rng.randrange(500)}",
                  "started": "2026-11-24T00:48:43+0000"}
    text = identity.config_yaml(cfg, provenance if status != "pending" else {})
    if status == "corrupt" and rng.random() < 0.5:
        text = text[: len(text) // 2]  # a config.yaml cut short
    (folder / identity.CONFIG).write_text(text)
    if status == "pending":
        return
    accs = [min(99.0, 10 + 80 * (1 - 0.9 ** e) + rng.gauss(0, 0.5)) for e in range(1, epochs + 1)]
    (folder / identity.METRICS).write_text("".join(json.dumps(
        {"epoch": e, "step": 390 * e, "time_s": 20.1, "train_loss": 0.5, "train_acc": acc + 5,
         "val_acc": acc + 0.3, "val_top5": 99.0, "val_loss": 0.4, "test_acc": acc, "test_top5": 99.1,
         "test_loss": 0.41}, sort_keys=True) + "\n" for e, acc in enumerate(accs, 1)))
    (folder / identity.CHECKPOINT).write_bytes(b"")
    if status == "failed":
        (folder / identity.ERROR).write_text(json.dumps(
            {"status": "failed", "error": "RuntimeError: CUDA out of memory", "time": 1.7e9}))
    if status in ("done", "corrupt"):
        # final.pt: a small zip shaped like torch.save's (the index checks its directory only)
        with zipfile.ZipFile(folder / identity.FINAL, "w") as z:
            z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        size = (folder / identity.FINAL).stat().st_size
        text = json.dumps({**result(cfg, accs), "final": {"file": identity.FINAL, "bytes": size}},
                          indent=1, sort_keys=True) + "\n"
        (folder / identity.RESULT).write_text(text[: len(text) // 3] if status == "corrupt" else text)


def result(cfg: Config, accs: list[float]) -> dict:
    dense = cfg.run.stage == "pretrain"
    kept = 1.0 if dense else cfg.prune.k
    return {"arch": cfg.model.arch, "best_epoch": len(accs), "best_val_acc": accs[-1] + 0.3,
            "dataset": cfg.data.dataset, "device": "NVIDIA A100-SXM4-80GB", "epochs": len(accs),
            "k": cfg.prune.k, "layer_type": cfg.prune.layer_type, "macs_dense": 40551040,
            "macs_effective": int(40551040 * kept), "method": "dense" if dense else cfg.prune.method,
            "params_dense": 269722, "params_effective": int(269722 * kept), "parent_id": cfg.run.parent,
            "run_id": identity.run_id(cfg), "seed": cfg.run.seed,
            "sparsity": None if dense else {"kept": int(268336 * kept), "kept_fraction": kept,
                                            "total": 268336, "weight_kept_fraction": kept,
                                            "weights_kept": int(268336 * kept), "weights_total": 268336},
            "stage": cfg.run.stage, "status": "done", "test_acc": accs[-1], "test_acc_at_best_val": accs[-1],
            "test_top5": 99.1, "val_acc": accs[-1] + 0.3, "wall_time_s": 3210.5, "world_size": 1}


def generate(root: Path, n: int, epochs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    statuses, weights = zip(*STATUS_MIX.items())
    for cfg in itertools.islice(configs(), n):
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, result_dir=str(root)))
        write_run(root, cfg, rng.choices(statuses, weights)[0], rng, epochs)


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def child_cpu() -> float:
    """CPU seconds used by finished child processes (wall time alone suffers on a busy box)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20, help="metrics.jsonl lines per started run")
    parser.add_argument("--plots", action="store_true", help="also time one collect(plots=True)")
    parser.add_argument("--root", type=Path, help="generate here and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bip-collect-") as tmp:
        root = args.root or Path(tmp)
        t0 = time.perf_counter()
        generate(root, args.runs, args.epochs)
        print(f"generated {args.runs} run folders in {time.perf_counter() - t0:.1f} s under {root}")
        # Every scan warns once per corrupt folder: keep stderr quiet and print counts instead.
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            # A fresh process each time: interpreter start, imports and a cold parse memo
            # included, as `python launch/collect.py ROOT` runs after a sweep.
            cpu0 = child_cpu()
            cli = timed(lambda: subprocess.run([sys.executable, str(SCRIPT), str(root)], check=True,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                        args.repeat)
            cpu = (child_cpu() - cpu0) / args.repeat
            rows = collect.scan(root)
            warm = timed(lambda: collect.collect(root), args.repeat)
            with_plots = timed(lambda: collect.collect(root, plots=True), 1) if args.plots else None
        counts = {s: sum(row["status"] == s for row in rows) for s in collect.STATUSES}
        print("statuses: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
        median = statistics.median(cli)
        print(f"collect.py ROOT (new process): median {median:.2f} s over {args.repeat} "
              f"({', '.join(f'{t:.2f}' for t in cli)}); {1e6 * median / args.runs:.0f} us per run folder; "
              f"{cpu:.2f} CPU s per run")
        print(f"collect() again in one process: median {statistics.median(warm):.2f} s")
        if with_plots:
            print(f"collect(plots=True): {with_plots[0]:.2f} s")
        if args.runs == 10_000:
            print(f"goal (<= 5 s for 10,000 folders): {'met' if median <= 5 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
