"""Inference latency of dense, masked and physically thinned structured models, side by side.

    python benchmarks/latency.py [--arch resnet18] [--layer-types filter channel] [--k 0.5]
                                 [--batches 1 64] [--repeats 9] [--device cuda] [--threads N]

For each layer type and k: the masked model (scores from the weights of a seeded random init,
so the masks are per-layer top-k patterns like a pruning run's), its dense-with-zeros twin and
its thinned form (bip.export.thin, checked equal first). Every round times each model once (median
over rounds; warmed up first), so load on the shared machine hits all three alike. CPU: fp32;
CUDA: bf16 + channels_last. Prints latencies, speedup = dense / thin, the MAC reduction
(dense MACs / thinned MACs), their ratio against the goal (speedup >= 0.8 x MAC reduction at
batch 64 for CIFAR ResNet-18, filter and channel, k = 0.5), and the sizes of the three files
on disk. The load average before and after says how busy the machine was.

OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE, unless set): on a shared, oversubscribed
machine spinning threads steal the cores their siblings need, and two threads then ran slower
than one (README). It applies to all three models alike.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP
import tempfile
from pathlib import Path

import torch  # noqa: E402

from bip.export import latency  # noqa: E402
from bip.pruning import masking
from bip.models.accounting import count_params_and_macs  # noqa: E402
from bip.export.run import dense_state_dict, export_thin
from bip.models import create_model  # noqa: E402
from bip.export.thin import dense_copy  # noqa: E402

GOAL = 0.8


def build(arch: str, layer_type: str, k: float, size: int):
    torch.manual_seed(0)
    model = create_model(arch, 10, layer_type)
    masking.init_scores(model, "magnitude")
    masking.refresh_masks(model, k)
    model.eval()
    thinned, content, summary = export_thin(model, (3, size, size), {"arch": arch, "num_classes": 10})
    return model, thinned, content, summary


def file_sizes(model, content, folder: Path) -> dict[str, int]:
    files = {"dense": dense_state_dict(model), "masked": model.state_dict(), "thin": content}
    sizes = {}
    for name, obj in files.items():
        torch.save(obj, folder / f"{name}.pt")
        sizes[name] = (folder / f"{name}.pt").stat().st_size
    return sizes


def run(arch: str, args, device: torch.device, shape: tuple) -> bool:
    """Time and count one arch; True if it missed the goal."""
    precision = "bf16" if device.type == "cuda" else "fp32"
    print(f"{arch} {shape}, {latency.device_name(device)}, {precision} "
          f"{'NCHW' if args.nchw else 'channels_last'}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"load average {latency.load_average()}")
    print(f"{'layer':8s} {'k':>5s} {'batch':>5s} {'dense ms':>9s} {'masked ms':>9s} {'thin ms':>9s} "
          f"{'speedup':>7s} {'MAC red.':>8s} {'ratio':>6s}  goal")
    failed = False
    rows = []
    for layer_type in args.layer_types:
        for k in args.k:
            model, thinned, content, summary = build(arch, layer_type, k, args.input_size)
            macs = summary["macs"]
            reduction = macs["dense"] / macs["thin"]
            with tempfile.TemporaryDirectory() as tmp:
                sizes = file_sizes(model, content, Path(tmp))
            models = {"dense": dense_copy(model), "masked": model, "thin": thinned}
            for batch in args.batches:
                ms = latency.compare(models, shape, batch, device, args.warmup, args.repeats,
                                     channels_last=not args.nchw)
                speedup = ms["dense"] / ms["thin"]
                ratio = speedup / reduction
                goal = ""
                if batch == 64 and arch == "resnet18" and k == 0.5:
                    goal = "ok" if ratio >= GOAL else f"MISSED (< {GOAL})"
                    failed |= ratio < GOAL
                print(f"{layer_type:8s} {k:5.2f} {batch:5d} {ms['dense']:9.2f} {ms['masked']:9.2f} "
                      f"{ms['thin']:9.2f} {speedup:6.2f}x {reduction:7.2f}x {ratio:6.2f}  {goal}", flush=True)
            rows.append((layer_type, k, macs, summary["params"], sizes))
    print(f"load average after: {latency.load_average()}")
    print(f"\n{'layer':8s} {'k':>5s} {'MACs dense':>12s} {'effective':>12s} {'thin':>12s} "
          f"{'zero kept':>11s} {'params eff.':>11s} {'params thin':>11s} {'dense.pt':>9s} {'masked':>9s} "
          f"{'thin.pt':>9s}")
    for layer_type, k, macs, params, sizes in rows:
        print(f"{layer_type:8s} {k:5.2f} {macs['dense']:12,d} {macs['effective']:12,d} {macs['thin']:12,d} "
              f"{macs['zero_kept']:11,d} {params['effective']:11,d} {params['thin']:11,d} "
              + " ".join(f"{sizes[n] / 2**20:7.2f}MB" for n in ("dense", "masked", "thin")))
    count = count_params_and_macs(create_model(arch, 10, "dense"), shape)
    print(f"(dense {arch}: {count['params_dense']:,} params, {count['macs_dense']:,} MACs per image)")
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=["resnet18"])
    p.add_argument("--layer-types", nargs="+", default=["filter", "channel"])
    p.add_argument("--k", type=float, nargs="+", default=[0.5])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 64],
                   help="none: only the counts and file sizes")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--nchw", action="store_true",
                   help="time in the NCHW memory format (default channels_last)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = (3, args.input_size, args.input_size)
    failed = False
    for arch in args.arch:
        failed |= run(arch, args, device, shape)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
