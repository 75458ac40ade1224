"""Time per training step of HYDRA and BiP relative to dense training, measured side by side.

    python benchmarks/step_cost.py [--arch resnet18] [--batch-size 128] [--steps 10] [--device cuda]
                                   [--layer-type unstructured|filter|channel|nm]

Same model, same batch, interleaved rounds (dense, hydra, bip, bip-reference, mask update, ...)
so machine noise hits every method alike; prints medians and ratios. Goals (CIFAR resnet18):
hydra <= 1.05x dense, bip <= 2.1x dense, mask update <= 2% of a (hydra) step and <= 63 ms on
the 2-core CPU machine (the sync-free global top-k over 11.2M scores).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bip import masking
from bip.config import load_config
from bip.methods import create_method
from bip.models import create_model


def build(arch: str, method: str, device: torch.device, precision: str, layer_type: str):
    stage = "pretrain" if method == "dense" else "prune"
    overrides = [f"run.stage={stage}", f"train.mixed_precision={precision}"]
    if stage == "prune":
        name, _, variant = method.partition("-")
        overrides += [f"prune.layer_type={layer_type}", f"prune.method={name}",
                      "prune.score_init=magnitude", f"bip.variant={variant or 'paper'}"]
        overrides += [] if layer_type == "nm" else ["prune.k=0.1"]
    cfg = load_config([], overrides)
    torch.manual_seed(0)
    model = create_model(arch, 10, "dense" if stage == "pretrain" else layer_type).to(device)
    return create_method(cfg, model), cfg  # train.mixed_precision sets the method's autocast


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--methods", nargs="+", default=["dense", "hydra", "bip", "bip-reference"])
    p.add_argument("--layer-type", default="unstructured", choices=["unstructured", "filter", "channel", "nm"])
    args = p.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, 32, 32, generator=g).to(device),
                torch.randint(0, 10, (args.batch_size,), generator=g).to(device)) for _ in range(2)]
    methods = {name: build(args.arch, name, device, args.precision, args.layer_type) for name in args.methods}
    times: dict[str, list[float]] = {name: [] for name in methods}
    times["mask update"] = []
    hydra = methods.get("hydra") or methods[next(n for n in methods if n != "dense")]
    for round_ in range(args.warmup + args.steps):
        for name, (method, _) in methods.items():
            sync(device)
            t = time.perf_counter()
            method.step(batches[:method.streams], 0.0)
            sync(device)
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - t)
        sync(device)
        t = time.perf_counter()
        masking.refresh_masks(hydra[0].core, hydra[1].prune.k)
        sync(device)
        if round_ >= args.warmup:
            times["mask update"].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    dense = med.get("dense")
    print(f"{args.arch}, batch {args.batch_size}, {device} ({torch.get_num_threads()} threads), "
          f"{args.precision}, {args.layer_type}, median of {args.steps} interleaved rounds")
    print("| what | ms / step | x dense |")
    print("|---|---|---|")
    for name, value in med.items():
        ratio = f"{value / dense:.2f}" if dense else "-"
        print(f"| {name} | {1000 * value:.1f} | {ratio} |")
    step = med.get("hydra") or next(v for n, v in med.items() if n not in ("dense", "mask update"))
    print(f"mask update = {100 * med['mask update'] / step:.1f}% of a hydra step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
