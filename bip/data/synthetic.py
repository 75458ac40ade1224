"""`synthetic`: class-dependent smooth patterns plus noise; learnable, any size, made on the fly.

Each class has a fixed low-frequency colour pattern; a sample is its class pattern, randomly
shifted by up to 4 pixels, plus pixel noise. A small CNN separates the classes within an epoch
or two, so tests and benchmarks can check learning without any download.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bip.data.base import ArraySplit, DatasetSpec
from bip.data import register_dataset


def make_split(n: int, num_classes: int, seed: int, size: int = 32) -> ArraySplit:
    patterns_rng = torch.Generator().manual_seed(12345)  # the same classes for every split
    coarse = torch.rand(num_classes, 3, 4, 4, generator=patterns_rng)
    patterns = F.interpolate(coarse, size=(size + 8, size + 8), mode="bilinear", align_corners=False)
    rng = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=rng)]
    dy, dx = torch.randint(0, 9, (2, n), generator=rng)
    rows = (dy[:, None] + torch.arange(size))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(size))[:, None, None, :]
    images = patterns[labels[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    images = 0.7 * images + 0.3 * torch.rand(n, 3, size, size, generator=rng)
    return ArraySplit((images * 255).round().clamp(0, 255).to(torch.uint8), labels.long())


@register_dataset("synthetic")
def synthetic(cfg, num_classes: int = 0) -> DatasetSpec:
    classes = num_classes or 10
    train = make_split(cfg.synthetic_size, classes, seed=1)
    test = make_split(max(cfg.synthetic_size // 4, classes), classes, seed=2)
    return DatasetSpec(classes, train, test, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
