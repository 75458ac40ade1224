"""Training-loader throughput: bip's ffcv stream vs torchvision ImageFolder + DataLoader on the
same JPEGs (goal: ffcv >= 3x); with --tensor, BiP epochs through the in-memory tensor loader.

    python benchmarks/loader_throughput.py [--images 2400] [--workers 2] [--res 128]
                                           [--epochs 5] [--jpeg-fraction 0.5]
    python benchmarks/loader_throughput.py --tensor [--images 45000] [--batch-size 128]

Writes N JPEGs (ImageNet-like decode work: 320x240, photo-like content, quality 90) as an
ImageFolder and a .beton of them, then times one training epoch of each loader: (a) the ffcv
stream data.loader=ffcv trains on (random-resized-crop decode, flip, normalise; CPU or GPU op
order), (b) ImageFolder + RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize
through a DataLoader (persistent workers, shuffled, the same batch size and worker count).
Both hand float32 NCHW batches to the device. The first epoch is a warm-up (numba compiles
ffcv's pipeline; workers start); the figures are medians over the others: images/s, and
images per CPU-second of this process and its workers (on a shared machine wall time also
measures the neighbours; the load average is printed).

--tensor: a CIFAR-sized synthetic training split (--images, 32x32) on the device (CUDA when
present), both of BiP's streams (pad-crop + flip + normalise on the device), as the training
loop reads them; images/s over each epoch, the device synchronised at its end only.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bip.data.base import IMAGENET_MEAN, IMAGENET_STD


def make_jpegs(root: Path, n: int, classes: int, size: tuple[int, int]) -> Path:
    """An ImageFolder (train/ with n images, val/ with one per class); reused if complete."""
    marker = root / f"done-{n}-{classes}-{size[0]}x{size[1]}"
    if marker.exists():
        return root
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", classes)):
        for i in range(count):
            folder = root / split / f"c{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            # Smooth shapes plus sensor-like noise: about the entropy of a photo, so that
            # decoding costs what it costs on ImageNet.
            coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
            image = np.asarray(coarse.resize(size, Image.BICUBIC), dtype=np.int16)
            image = image + rng.normal(0, 8, image.shape).astype(np.int16)
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    marker.touch()
    return root


def ffcv_epochs(folder: Path, beton: Path, args, device: torch.device) -> list[float]:
    from bip.config import load_config
    from bip.data import load_dataset
    from bip.data.ffcv.loader import build_ffcv_loaders
    cfg = load_config([], ["data.dataset=ImageNet", f"data.data_dir={folder}", "data.loader=ffcv",
                           f"data.train_beton={beton}", f"data.val_beton={beton}",
                           f"data.image_size={args.res}", f"data.batch_size={args.batch_size}",
                           f"data.num_workers={args.workers}", "data.val_fraction=0",
                           "data.normalize=true"]).data
    spec = load_dataset(cfg)
    spec = dataclasses.replace(spec, test=spec.train)  # one file serves both
    stream = build_ffcv_loaders(cfg, spec, seed=0, streams=1, rank=0, world=1,
                                device=device).streams[0]
    return [_timed(stream.epoch(e), device) for e in range(args.epochs)]


def torchvision_epochs(folder: Path, args, device: torch.device) -> list[float]:
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder
    tf = T.Compose([T.RandomResizedCrop(args.res), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = torch.utils.data.DataLoader(
        ImageFolder(str(folder / "train"), tf), args.batch_size, shuffle=True, drop_last=True,
        num_workers=args.workers, persistent_workers=args.workers > 0,
        pin_memory=device.type == "cuda")

    def batches():
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return [_timed(batches(), device) for _ in range(args.epochs)]


def tensor_epochs(args, device: torch.device) -> list[tuple[float, float]]:
    from bip.config import load_config
    from bip.data import load_dataset
    from bip.data.loaders import build_loaders
    cfg = load_config([], ["data.dataset=synthetic", f"data.synthetic_size={args.images}",
                           f"data.batch_size={args.batch_size}", "data.normalize=true",
                           "data.val_fraction=0"]).data
    loaders = build_loaders(cfg, load_dataset(cfg), seed=0, streams=2, rank=0, world=1, device=device)

    def bip_epoch(epoch):
        for a, b in zip(*(s.epoch(epoch) for s in loaders.streams)):
            yield a
            yield b
    print(f"tensor loader: {args.images} images 32x32, BiP's 2 streams x {len(loaders.streams[0])} "
          f"steps x {args.batch_size}, {device}; load average {os.getloadavg()[0]:.1f}", flush=True)
    return [_timed(bip_epoch(e), device) for e in range(args.epochs)]


def _timed(batches, device: torch.device) -> tuple[float, float]:
    """(images per second, images per CPU-second) of one epoch. CPU time is this process's
    (all threads) plus its worker processes', read from /proc on Linux."""
    start, cpu, n = time.perf_counter(), _cpu_seconds(), 0
    for x, _ in batches:
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return n / wall, n / cpu if cpu > 0 else float("nan")


def _cpu_seconds() -> float:
    pids = [os.getpid()]
    for children in Path("/proc/self/task").glob("*/children"):  # the DataLoader's workers
        pids += [int(p) for p in children.read_text().split()]
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # a worker that just exited, or not Linux
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2400)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--size", default="320x240", help="JPEG width x height")
    p.add_argument("--res", type=int, default=128, help="training resolution (crop output)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5, help="including one warm-up epoch")
    p.add_argument("--jpeg-fraction", type=float, default=0.5, help="stored as JPEG in the "
                   ".beton, the rest raw: 0.5 as `write --dataset ImageNet` (ffcv-imagenet's "
                   "recipe); 1 = all JPEG, the same decode work as torchvision; 0 = all raw")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bip-loader-throughput"))
    p.add_argument("--tensor", action="store_true", help="time the in-memory tensor loader instead")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tensor:
        per_epoch = tensor_epochs(args, device)
        print(f"tensor       {statistics.median(r for r, _ in per_epoch[1:]):7.0f} images/s  "
              f"(epochs: {', '.join(f'{r:.0f}' for r, _ in per_epoch)}; first = warm-up)")
        return 0
    from bip.data.ffcv.loader import require_ffcv
    require_ffcv()
    from bip.data.ffcv.write import source_split, write_beton

    size = tuple(int(v) for v in args.size.split("x"))
    folder = make_jpegs(args.workdir / "images", args.images, args.classes, size)
    beton = args.workdir / f"train-{args.images}-{args.size}-jpeg{args.jpeg_fraction:g}.beton"
    if not beton.exists():
        items, _ = source_split("ImageNet", "train", str(folder))
        write_beton(items, beton, max_resolution=500, jpeg_fraction=args.jpeg_fraction,
                    quality=90, workers=args.workers)
    print(f"{args.images} JPEGs {args.size} -> random-resized crop {args.res}, batch "
          f"{args.batch_size}, {args.workers} workers, {device}; .beton {beton.stat().st_size >> 20} "
          f"MiB ({args.jpeg_fraction:g} JPEG); load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores", flush=True)
    wall, cpu = {}, {}
    for name, run in (("ffcv", lambda: ffcv_epochs(folder, beton, args, device)),
                      ("torchvision", lambda: torchvision_epochs(folder, args, device))):
        per_epoch = run()
        wall[name] = statistics.median(rate for rate, _ in per_epoch[1:])
        cpu[name] = statistics.median(rate for _, rate in per_epoch[1:])
        print(f"{name:12s} {wall[name]:7.0f} images/s  {cpu[name]:7.0f} images/CPU-s  (epochs: "
              f"{', '.join(f'{rate:.0f}' for rate, _ in per_epoch)}; first = warm-up)", flush=True)
    print(f"ratio ffcv / torchvision: {wall['ffcv'] / wall['torchvision']:.2f}x images/s, "
          f"{cpu['ffcv'] / cpu['torchvision']:.2f}x images per CPU-second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
