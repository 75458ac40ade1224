"""He et al. (2016) CIFAR ResNet-20/32/44/56/110 with option-A shortcuts (parameter-free:
stride-2 subsampling plus zero-padded channels), as in akamaster/pytorch_resnet_cifar10.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bip.pruning.layers import LayerFactory
from bip.models import register_model


class ZeroPadShortcut(nn.Module):
    """Option A: no weights, so the pruning budget covers exactly the 3x3 convs and the fc."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra_channels - half))


class BasicBlock(nn.Module):
    def __init__(self, layers: LayerFactory, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = layers.conv(in_planes, planes, 3, stride, padding=1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = layers.conv(planes, planes, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(planes)
        changes_shape = stride != 1 or in_planes != planes
        self.shortcut = ZeroPadShortcut(planes - in_planes) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetS(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int, layers: LayerFactory):
        super().__init__()
        self.conv1 = layers.conv(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            strides = [stride] + [1] * (blocks_per_stage - 1)
            blocks = []
            for block_stride in strides:
                blocks.append(BasicBlock(layers, in_planes, planes, block_stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = layers.linear(64, num_classes)

        # As the reference: Kaiming-normal (fan_in) weights; biases keep PyTorch's default.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        # avg_pool2d as the reference (akamaster, BiP's models/resnets.py): the same value as a
        # mean over (2, 3), rounded differently, and the reference variant must be bitwise.
        out = F.avg_pool2d(out, out.size(3))
        return self.fc(out.view(out.size(0), -1))


@register_model
def resnet20s(num_classes: int, layers: LayerFactory) -> nn.Module:
    return ResNetS(3, num_classes, layers)


@register_model
def resnet32s(num_classes: int, layers: LayerFactory) -> nn.Module:
    return ResNetS(5, num_classes, layers)


@register_model
def resnet44s(num_classes: int, layers: LayerFactory) -> nn.Module:
    return ResNetS(7, num_classes, layers)


@register_model
def resnet56s(num_classes: int, layers: LayerFactory) -> nn.Module:
    return ResNetS(9, num_classes, layers)


@register_model
def resnet110s(num_classes: int, layers: LayerFactory) -> nn.Module:
    return ResNetS(18, num_classes, layers)
