"""torchvision-style ImageNet ResNet18/34/50: 7x7 stride-2 stem + max-pool, 1x1 conv + BN
downsample shortcuts. Module names match torchvision's, so its (dense) state dicts load as is.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bip.pruning.layers import LayerFactory
from bip.models import register_model
from bip.models.resnet_cifar import BasicBlock, Bottleneck, make_stages


class ImageNetResNet(nn.Module):
    def __init__(self, block: type[BasicBlock | Bottleneck], depths: list[int], num_classes: int,
                 layers: LayerFactory):
        super().__init__()
        self.conv1 = layers.conv(3, 64, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1, self.layer2, self.layer3, self.layer4 = make_stages(layers, block, depths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = layers.linear(512 * block.expansion, num_classes)

        # torchvision's init without zero_init_residual (the reference does not zero-init either).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.avgpool(out), 1))


@register_model
def ResNet18(num_classes: int, layers: LayerFactory) -> nn.Module:  # noqa: N802 (reference key)
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], num_classes, layers)


@register_model
def ResNet34(num_classes: int, layers: LayerFactory) -> nn.Module:  # noqa: N802
    return ImageNetResNet(BasicBlock, [3, 4, 6, 3], num_classes, layers)


@register_model
def ResNet50(num_classes: int, layers: LayerFactory) -> nn.Module:  # noqa: N802
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes, layers)
