"""`python -m bip.data download CIFAR10|CIFAR100 --data-dir DIR`: the only way bip downloads data.

Training never downloads; this fetches the standard CIFAR archives with torchvision into
DIR/cifar-10-batches-py (or cifar-100-python), the layout the readers expect. TinyImageNet and
ImageNet are too large to fetch implicitly; see README for their layouts.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bip.data", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download CIFAR10 or CIFAR100 with torchvision")
    dl.add_argument("dataset", choices=["CIFAR10", "CIFAR100"])
    dl.add_argument("--data-dir", default="./data")
    args = p.parse_args(argv)
    from torchvision import datasets
    cls = datasets.CIFAR10 if args.dataset == "CIFAR10" else datasets.CIFAR100
    try:
        for train in (True, False):
            cls(args.data_dir, train=train, download=True)
    except (OSError, RuntimeError) as err:  # no network, disk full, bad checksum
        print(f"error: downloading {args.dataset} failed: {err}", file=sys.stderr)
        return 2
    print(args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
