"""`digits`: scikit-learn's 1,797 handwritten digits (shipped inside the package, so offline),
upsampled from 8x8 to 3x32x32. A real dataset small enough for the CPU demo."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bip.data.base import ArraySplit, DatasetSpec
from bip.data import register_dataset
from bip.errors import BipError

TEST_FRACTION = 0.2


@register_dataset("digits")
def digits(cfg, num_classes: int = 0) -> DatasetSpec:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise BipError("the digits dataset needs scikit-learn: pip install -e '.[demo]'") from None
    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(raw.target, dtype=torch.int64)
    # A fixed test split, the same for every run.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = int(len(labels) * TEST_FRACTION)
    test, train = order[:n_test].sort().values, order[n_test:].sort().values
    mean, std = (images.float() / 255).mean().item(), (images.float() / 255).std().item()
    return DatasetSpec(10, ArraySplit(images[train], labels[train]),
                       ArraySplit(images[test], labels[test]), (mean,) * 3, (std,) * 3)
