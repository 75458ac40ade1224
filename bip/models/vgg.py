"""VGG-11/13/16/19 (plain and _bn) for 32x32 inputs: the standard conv configurations, global
average pooling and a single linear 512 -> num_classes, the CIFAR VGG of lottery-ticket papers.

The reference's VGG (three-layer classifier) raises at construction, so it cannot be the one its
results came from; we use this common form instead.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bip.pruning.layers import LayerFactory
from bip.models import register_model

# Output channels of each 3x3 conv; "M" is a 2x2 max-pool.
CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, depth: int, batch_norm: bool, num_classes: int, layers: LayerFactory):
        super().__init__()
        features: list[nn.Module] = []
        in_channels = 3
        for item in CONFIGS[depth]:
            if item == "M":
                features.append(nn.MaxPool2d(2))
                continue
            # A conv bias right before BatchNorm would be cancelled by its mean subtraction.
            features.append(layers.conv(in_channels, item, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                features.append(nn.BatchNorm2d(item))
            features.append(nn.ReLU(inplace=True))
            in_channels = item
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = layers.linear(512, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model
def vgg11(num_classes: int, layers: LayerFactory) -> nn.Module:
    return VGG(11, False, num_classes, layers)


@register_model
def vgg13(num_classes: int, layers: LayerFactory) -> nn.Module:
    return VGG(13, False, num_classes, layers)


@register_model
def vgg16(num_classes: int, layers: LayerFactory) -> nn.Module:
    return VGG(16, False, num_classes, layers)


@register_model
def vgg19(num_classes: int, layers: LayerFactory) -> nn.Module:
    return VGG(19, False, num_classes, layers)


@register_model
def vgg11_bn(num_classes: int, layers: LayerFactory) -> nn.Module:
    return VGG(11, True, num_classes, layers)


@register_model
def vgg13_bn(num_classes: int, layers: LayerFactory) -> nn.Module:
    return VGG(13, True, num_classes, layers)


@register_model
def vgg16_bn(num_classes: int, layers: LayerFactory) -> nn.Module:
    return VGG(16, True, num_classes, layers)


@register_model
def vgg19_bn(num_classes: int, layers: LayerFactory) -> nn.Module:
    return VGG(19, True, num_classes, layers)
