"""Time per training step of HYDRA and BiP relative to dense training, measured side by side.

    python benchmarks/step_cost.py [--arch resnet18] [--batch-size 128] [--steps 10] [--device cuda]
                                   [--layer-type unstructured|filter|channel|nm] [--precision bf16]
                                   [--channels-last] [--compile [--compile-backend inductor]]
                                   [--threads N] [--json PATH]

Same model, same batch, interleaved rounds (dense, hydra, bip, bip-fused, bip-reference, mask
update, ...) so machine noise hits every method alike; prints medians and ratios. Goals (CIFAR
resnet18): hydra <= 1.05x dense (GPU: 1.1x), bip (paper) <= 2.1x dense, bip-fused (one pass,
bip/methods/fused.py) <= 1.15x dense, mask update <= 2% of a (hydra) step and
<= 63 ms on the 2-core CPU machine (the sync-free global top-k over 11.2M scores).
--channels-last / --compile apply train.channels_last / train.compile (bip.train.compile) to every
method's model; the warm-up rounds compile each pass kind once, and the table reports how many
graphs were compiled after them (0: no step recompiles).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from bip.pruning import masking
from bip.config import load_config
from bip.methods.registry import create_method
from bip.models import create_model
from bip.testing.compile import CompileCounter
from bip.train.compile import compile_model, to_channels_last


def build(arch: str, method: str, device: torch.device, precision: str, layer_type: str,
          channels_last: bool = False, compiler=None):
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
    if channels_last:   # bip.train.compile.prepare_model, with the benchmark's compile counter
        to_channels_last(model)
    if compiler is not None:
        compile_model(model, backend=compiler)
    return create_method(cfg, model), cfg  # train.mixed_precision sets the method's autocast


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--methods", nargs="+", default=["dense", "hydra", "bip", "bip-fused", "bip-reference"])
    p.add_argument("--layer-type", default="unstructured", choices=["unstructured", "filter", "channel", "nm"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default="", help="also write the figures to this file")
    return p


def measure(args) -> dict:
    """Median seconds per step of each method and of one mask update, interleaved rounds."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    size = (args.batch_size, 3, args.image_size, args.image_size)
    batches = [(torch.randn(*size, generator=g).to(device),
                torch.randint(0, 10, (args.batch_size,), generator=g).to(device)) for _ in range(2)]
    counter = CompileCounter(args.compile_backend) if args.compile else None
    methods = {name: build(args.arch, name, device, args.precision, args.layer_type,
                           args.channels_last, counter) for name in args.methods}
    times: dict[str, list[float]] = {name: [] for name in methods}
    times["mask update"] = []
    hydra = methods.get("hydra") or methods[next(n for n in methods if n != "dense")]
    warm_graphs, start = 0, time.perf_counter()
    for round_ in range(args.warmup + args.steps):
        if round_ == args.warmup:
            warm_graphs, warmup_s = counter.graphs if counter else 0, time.perf_counter() - start
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
    step = med.get("hydra") or next(v for n, v in med.items() if n not in ("dense", "mask update"))
    return {
        "arch": args.arch, "batch_size": args.batch_size, "image_size": args.image_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "precision": args.precision,
        "layer_type": args.layer_type, "channels_last": args.channels_last,
        "compile": args.compile_backend if args.compile else "", "rounds": args.steps,
        "ms": {name: 1000 * v for name, v in med.items()},
        "x_dense": {name: v / med["dense"] for name, v in med.items()} if "dense" in med else {},
        "mask_update_pct_of_hydra": 100 * med["mask update"] / step,
        "warmup_s": warmup_s,  # the warm-up rounds (with --compile: compiling every pass kind)
        "graphs_warmup": warm_graphs if counter else None,
        "graphs_after_warmup": counter.graphs - warm_graphs if counter else None,
    }


def report(r: dict) -> str:
    options = [r["precision"], r["layer_type"]] + (["channels_last"] if r["channels_last"] else [])
    options += [f"compiled ({r['compile']})"] if r["compile"] else []
    lines = [f"{r['arch']}, batch {r['batch_size']}, {r['device']} ({r['threads']} threads), "
             f"{', '.join(options)}, median of {r['rounds']} interleaved rounds",
             "| what | ms / step | x dense |", "|---|---|---|"]
    for name, ms in r["ms"].items():
        ratio = f"{r['x_dense'][name]:.2f}" if r["x_dense"] else "-"
        lines.append(f"| {name} | {ms:.1f} | {ratio} |")
    lines.append(f"mask update = {r['mask_update_pct_of_hydra']:.1f}% of a hydra step")
    ms = r["ms"]
    for other in ("bip", "bip-reference"):
        if "bip-fused" in ms and other in ms:
            lines.append(f"bip-fused step: {ms[other] / ms['bip-fused']:.2f}x faster than {other}")
    if r["compile"]:
        lines.append(f"graphs compiled: {r['graphs_warmup']} in warm-up, {r['graphs_after_warmup']} after")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    result = measure(args)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
