"""The names of the built-in architectures and datasets, readable without importing torch.

The registries (bip.models.MODELS, bip.data.DATASETS) are the truth; they refuse to register a
name missing here, and tests/test_bad_input.py checks that nothing here is stale. The launcher
validates a grid's names against this list, so ``grid.py --dry-run`` checks every cell as a
submission would in half a second instead of first importing torch and torchvision (seconds).
A ``prefix:name`` arch (models from another zoo) is left to bip.models, which imports torch.
"""
from __future__ import annotations

from bip.errors import BipError

MODELS = frozenset({
    "resnet20s", "resnet32s", "resnet44s", "resnet56s", "resnet110s",          # resnet_s.py
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",              # resnet_cifar.py
    "ResNet18", "ResNet34", "ResNet50",                                        # resnet_imagenet.py
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",  # vgg.py
    "wrn_28_10", "wrn_28_4", "wrn_34_10", "wrn_40_2",                          # wide_resnet.py
})
DATASETS = frozenset({"CIFAR10", "CIFAR100", "TinyImageNet", "ImageNet", "ImageNetOrigin", "digits",
                      "synthetic"})


def listed(kind: str, name: str) -> str:
    """Registries call this: a built-in name must be listed here (so the launcher knows it)."""
    if ":" not in name and name not in (MODELS if kind == "model" else DATASETS):
        raise ValueError(f"{kind} {name!r} is not listed in bip/catalogue.py; add it there")
    return name


def check_arch(arch: str) -> None:
    if ":" in arch:  # another zoo's model: only bip.models can tell
        from bip.models import model_builder
        model_builder(arch)
    elif arch not in MODELS:
        raise BipError(f"unknown arch {arch!r}; choose one of: {', '.join(sorted(MODELS))}")


def check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise BipError(f"unknown dataset {dataset!r}; choose one of: {', '.join(sorted(DATASETS))}")
