"""Model registry: ``@register_model`` on a builder ``fn(num_classes, layers) -> nn.Module``.

Every builder creates its conv and linear layers through the given LayerFactory, so the same
architecture comes out dense, unstructured-masked, or filter/channel-masked.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from bip import catalogue
from bip.errors import BipError
from bip.layers import LayerFactory

Builder = Callable[[int, LayerFactory], nn.Module]
MODELS: dict[str, Builder] = {}


def register_model(fn: Builder) -> Builder:
    if fn.__name__ in MODELS:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    catalogue.listed("model", fn.__name__)
    MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(MODELS)


def model_builder(arch: str) -> Builder:
    if arch not in MODELS:
        raise BipError(f"unknown arch {arch!r}; choose one of: {', '.join(list_models())}")
    return MODELS[arch]


def create_model(arch: str, num_classes: int, layer_type: str = "dense") -> nn.Module:
    return model_builder(arch)(num_classes, LayerFactory(layer_type))


# The architectures register themselves on import; this list is the whole catalogue.
from bip.models import resnet_s, resnet_cifar, resnet_imagenet, vgg, wide_resnet  # noqa: E402,F401
