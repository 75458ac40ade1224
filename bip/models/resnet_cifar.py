"""kuangliu-style CIFAR ResNet-18/34/50/101/152, and the residual blocks and stage builder that
the torchvision-style ImageNet ResNets (bip.models.resnet_imagenet) reuse.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bip.pruning.layers import LayerFactory
from bip.models import register_model


def projection(layers: LayerFactory, in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    """1x1 conv + BN shortcut where the block changes shape; None means identity."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(layers.conv(in_planes, out_planes, 1, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, layers: LayerFactory, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = layers.conv(in_planes, planes, 3, stride, padding=1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = layers.conv(planes, planes, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(planes)
        # torchvision's attribute name, so its state dicts load into the ImageNet variants.
        self.downsample = projection(layers, in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv, as in torchvision and kuangliu."""

    expansion = 4

    def __init__(self, layers: LayerFactory, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = layers.conv(in_planes, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = layers.conv(planes, planes, 3, stride, padding=1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = layers.conv(planes, out_planes, 1)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample = projection(layers, in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def make_stages(layers: LayerFactory, block: type[BasicBlock | Bottleneck],
                depths: list[int]) -> list[nn.Sequential]:
    """Four stages of widths 64-128-256-512 (times the block's expansion); all but the first
    halve the resolution in their first block."""
    stages, in_planes = [], 64
    for index, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths)):
        strides = [1 if index == 0 else 2] + [1] * (depth - 1)
        blocks = []
        for stride in strides:
            blocks.append(block(layers, in_planes, planes, stride))
            in_planes = planes * block.expansion
        stages.append(nn.Sequential(*blocks))
    return stages


class CifarResNet(nn.Module):
    """3x3 stride-1 stem and no max-pool, so 32x32 inputs reach the last stage at 4x4; the
    adaptive pool lets 64x64 TinyImageNet inputs through unchanged."""

    def __init__(self, block: type[BasicBlock | Bottleneck], depths: list[int], num_classes: int,
                 layers: LayerFactory):
        super().__init__()
        self.conv1 = layers.conv(3, 64, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1, self.layer2, self.layer3, self.layer4 = make_stages(layers, block, depths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = layers.linear(512 * block.expansion, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model
def resnet18(num_classes: int, layers: LayerFactory) -> nn.Module:
    return CifarResNet(BasicBlock, [2, 2, 2, 2], num_classes, layers)


@register_model
def resnet34(num_classes: int, layers: LayerFactory) -> nn.Module:
    return CifarResNet(BasicBlock, [3, 4, 6, 3], num_classes, layers)


@register_model
def resnet50(num_classes: int, layers: LayerFactory) -> nn.Module:
    return CifarResNet(Bottleneck, [3, 4, 6, 3], num_classes, layers)


@register_model
def resnet101(num_classes: int, layers: LayerFactory) -> nn.Module:
    return CifarResNet(Bottleneck, [3, 4, 23, 3], num_classes, layers)


@register_model
def resnet152(num_classes: int, layers: LayerFactory) -> nn.Module:
    return CifarResNet(Bottleneck, [3, 8, 36, 3], num_classes, layers)
