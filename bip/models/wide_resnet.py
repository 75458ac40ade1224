"""Zagoruyko & Komodakis WideResNet-depth-k as used by TRADES and HYDRA: pre-activation blocks,
three stages of widths 16k/32k/64k. Unlike the reference, no unused "sub_block1" (its never-trained
weights took a share of the global top-k budget).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bip.pruning.layers import LayerFactory
from bip.models import register_model


class PreActBlock(nn.Module):
    def __init__(self, layers: LayerFactory, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = layers.conv(in_planes, out_planes, 3, stride, padding=1)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = layers.conv(out_planes, out_planes, 3, padding=1)
        # Each stage's first block changes the width, and only it strides, so in == out means identity.
        self.shortcut = layers.conv(in_planes, out_planes, 1, stride) if in_planes != out_planes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        # The projection reads the pre-activated input, as in the original WRN code.
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int, layers: LayerFactory):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        self.conv1 = layers.conv(3, 16, 3, padding=1)
        stages, in_planes = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            out_planes = width * widen_factor
            blocks = []
            for index in range(blocks_per_stage):
                blocks.append(PreActBlock(layers, in_planes, out_planes, stride if index == 0 else 1))
                in_planes = out_planes
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = layers.linear(in_planes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model
def wrn_28_10(num_classes: int, layers: LayerFactory) -> nn.Module:
    return WideResNet(28, 10, num_classes, layers)


@register_model
def wrn_28_4(num_classes: int, layers: LayerFactory) -> nn.Module:
    return WideResNet(28, 4, num_classes, layers)


@register_model
def wrn_34_10(num_classes: int, layers: LayerFactory) -> nn.Module:
    return WideResNet(34, 10, num_classes, layers)


@register_model
def wrn_40_2(num_classes: int, layers: LayerFactory) -> nn.Module:
    return WideResNet(40, 2, num_classes, layers)
