"""Every registered model builds in every layer type, trains one step, and has the published size."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from bip.pruning.layers import MaskedLayer
from bip.models import create_model, list_models

# Kept to dense + unstructured at batch 1 so the whole file stays well under a minute on 2 CPU cores.
BIG = {"resnet101", "resnet152", "wrn_28_10", "wrn_34_10"}
# Channel masking uses the same layer class as filter masking; a few shapes of each family suffice.
CHANNEL_SUBSET = {"resnet20s", "resnet18", "resnet50", "ResNet18", "vgg11_bn", "wrn_40_2"}


def weight_count(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def is_imagenet_style(arch: str) -> bool:
    # Registry convention (from the reference): capitalised keys are the ImageNet-style models.
    return arch[0].isupper()


def forward_cases() -> list[tuple[str, str]]:
    cases = []
    for arch in list_models():
        layer_types = ["dense", "unstructured"]
        if arch not in BIG:
            layer_types.append("filter")
        if arch in CHANNEL_SUBSET:
            layer_types.append("channel")
        cases += [(arch, layer_type) for layer_type in layer_types]
    return cases


def assert_layers_follow_type(model: nn.Module, layer_type: str) -> None:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert convs and linears
    if layer_type == "dense":
        assert not any(isinstance(m, MaskedLayer) for m in convs + linears)
        return
    assert all(isinstance(m, MaskedLayer) and m.granularity == layer_type for m in convs)
    if layer_type == "unstructured":
        assert all(isinstance(m, MaskedLayer) for m in linears)
    else:
        # Structured modes leave the classifier dense, as in the reference.
        assert all(type(m) is nn.Linear for m in linears)


@pytest.mark.parametrize("arch,layer_type", forward_cases())
def test_builds_from_factory_and_trains(arch: str, layer_type: str):
    """Catches a conv or linear built around the factory, and any layer cut off from the loss."""
    torch.manual_seed(0)
    model = create_model(arch, 10, layer_type).train()
    assert_layers_follow_type(model, layer_type)
    batch = 1 if arch in BIG else 2
    size = 64 if is_imagenet_style(arch) else 32
    logits = model(torch.randn(batch, 3, size, size))
    assert logits.shape == (batch, 10)

    F.cross_entropy(logits, torch.randint(0, 10, (batch,))).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("arch,num_classes,expected", [
    ("resnet20s", 10, 268_336),
    ("resnet56s", 10, 848_944),
    ("resnet18", 10, 11_164_352),
])
def test_weight_counts_match_reference(arch: str, num_classes: int, expected: int):
    assert weight_count(create_model(arch, num_classes)) == expected


@pytest.mark.parametrize("arch", ["ResNet18", "ResNet34", "ResNet50"])
def test_imagenet_resnets_match_torchvision(arch: str):
    model = create_model(arch, 1000)
    reference = getattr(torchvision.models, arch.lower())(num_classes=1000)
    assert weight_count(model) == weight_count(reference)
    # Same module names and shapes, so torchvision checkpoints load directly.
    model.load_state_dict(reference.state_dict())
