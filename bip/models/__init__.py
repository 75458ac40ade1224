"""Model registry: ``@register_model`` on a builder ``fn(num_classes, layers) -> nn.Module``,
plus any torchvision / timm classification model by name (``tv:<name>``, ``timm:<name>``).

Every built-in builder creates its conv and linear layers through the given LayerFactory, so
the same architecture comes out dense, unstructured-masked, or filter/channel-masked. External
models are built dense and, for a masked layer type, have their layers swapped
(bip.models.swap); see bip.models.external.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from bip.config import names
from bip.errors import BipError
from bip.pruning.layers import LayerFactory

Builder = Callable[[int, LayerFactory], nn.Module]
MODELS: dict[str, Builder] = {}


def register_model(fn: Builder) -> Builder:
    if fn.__name__ in MODELS:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    names.listed("model", fn.__name__)
    MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(MODELS)


def model_builder(arch: str) -> Callable[..., nn.Module]:
    """The builder for ``arch``; an unknown name is a one-line BipError (cheap: builds nothing)."""
    if external.is_external(arch):
        external.check_name(arch)
        return lambda num_classes, layer_type="dense", **options: create_model(
            arch, num_classes, layer_type, **options)
    if arch not in MODELS:
        raise BipError(f"unknown arch {arch!r}; choose one of: {', '.join(list_models())}, "
                       "or tv:<torchvision model>, timm:<timm model>")
    return MODELS[arch]


def model_options(model_cfg) -> dict:
    """The keyword options of create_model from a bip.config.ModelConfig (checkpoint meta
    stores them, so a run's model can be rebuilt exactly)."""
    skip = tuple(s for s in swap.SKIPS if getattr(model_cfg, f"skip_{s}"))
    return {"input_size": model_cfg.input_size, "skip": skip}


def check_skip(model_cfg, layer_type: str, skip: str) -> None:
    """A tv:/timm: model's ``prune.skip`` names existing layers in the canonical spelling
    (bip.pruning.masking.skipped_layers), checked on a model built on the meta device (no
    memory, no weights): for the launcher's --dry-run, before any job can fail on it."""
    import torch
    from bip.pruning import masking
    with torch.device("meta"):
        model = create_model(model_cfg.arch, model_cfg.num_classes or 10, layer_type, **model_options(model_cfg))
    masking.skipped_layers(model, tuple(s for s in skip.split(",") if s))


def create_model(arch: str, num_classes: int, layer_type: str = "dense", *, input_size: int = 0,
                 skip: tuple[str, ...] = ()) -> nn.Module:
    """``arch`` for ``num_classes`` with ``layer_type`` layers.

    input_size > 0: inputs of another size are resized to it on the device (ResizeInput); for
    tv:/timm: models 0 means their pretrained input size. skip: layers left dense (swap.SKIPS),
    tv:/timm: models only."""
    if not external.is_external(arch):
        if skip:
            raise BipError(f"model.skip_* options apply to tv:/timm: models; {arch} masks every "
                           "conv (and linear, unstructured) layer")
        model = model_builder(arch)(num_classes, LayerFactory(layer_type))
        size = input_size
    else:
        size = input_size or external.input_defaults(arch).size
        model = external.build(arch, num_classes, input_size)
        if layer_type != "dense":
            classifier, first_conv = external.layer_names(arch, model)
            try:
                swap.swap_layers(model, layer_type, skip, size, classifier, first_conv)
            except BipError as err:
                raise BipError(f"{arch}: {err}") from None
    if size:
        model.register_forward_pre_hook(external.ResizeInput(size))
    return model


# The architectures register themselves on import; this list is the whole catalogue.
from bip.models import external, swap  # noqa: E402
from bip.models import resnet_s, resnet_cifar, resnet_imagenet, vgg, wide_resnet  # noqa: E402,F401
