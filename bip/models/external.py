"""Models from torchvision (``tv:<name>``) and timm (``timm:<name>``), by name, made maskable.

A model is built with random initialisation (``weights=None`` / ``pretrained=False``: nothing
is ever downloaded); published weights come in as a state dict file through --source-net.
For a masked layer type its layers are swapped (bip.models.swap). Which names exist:
torchvision's classification builders (``torchvision.models.list_models``), and every timm
model (``timm.list_models()``, optionally with a pretrained tag: ``timm:vit_base_patch16_224.augreg_in21k``).

Input: ``input_defaults`` gives the model's native input size and mean/std from its pretrained
config (timm's pretrained_cfg; the transforms of torchvision's DEFAULT weights). Models with a
fixed input size (ViT, MaxViT, timm's fixed_input_size) are built for ``model.input_size``
when it is set, which changes their position-embedding shapes.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from bip.config.names import ZOO_PREFIXES
from bip.errors import BipError


@dataclass(frozen=True)
class InputSpec:
    size: int                                  # native (pretrained) resolution, square
    mean: tuple[float, float, float] | None    # pretrained normalisation, None if unknown
    std: tuple[float, float, float] | None
    fixed: bool                                # the architecture itself depends on the size


def is_external(arch: str) -> bool:
    return arch.startswith(ZOO_PREFIXES)


def _split(arch: str) -> tuple[str, str]:
    source, _, name = arch.partition(":")
    return source, name


def _timm():
    try:
        import timm
    except ImportError:
        raise BipError("timm: models need the timm extra: pip install 'bip[timm]'") from None
    return timm


@functools.lru_cache(maxsize=1)
def _tv_names() -> tuple[str, ...]:
    import torchvision
    return tuple(torchvision.models.list_models(module=torchvision.models))


def check_name(arch: str) -> None:
    """Raise a one-line BipError unless ``arch`` names a model that exists."""
    source, name = _split(arch)
    if source == "tv":
        if name not in _tv_names():
            raise BipError(f"unknown torchvision classification model {name!r} (arch {arch!r}); "
                           f"torchvision has: {', '.join(_tv_names())}")
    elif source == "timm":
        timm = _timm()
        base, dot, tag = name.partition(".")
        if not timm.is_model(base):
            raise BipError(f"unknown timm model {name!r} (arch {arch!r}); see timm.list_models()")
        if dot:  # a pretrained tag picks the input size and normalisation (input_defaults)
            _check_timm_tag(timm, arch, base, tag)
    else:
        raise BipError(f"unknown model source in {arch!r}; use one of: {', '.join(ZOO_PREFIXES)}")


def _check_timm_tag(timm, arch: str, base: str, tag: str) -> None:
    """``base.tag`` must be one of timm's pretrained configs (``resnet18.a1_in1k``): an unknown
    or empty tag is one line here, not timm's RuntimeError when the run starts."""
    tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{base}.*")]
    if tag not in tags:
        known = ", ".join(tags[:12]) + (", ..." if len(tags) > 12 else "") if tags else "none"
        raise BipError(f"unknown pretrained tag {tag!r} of timm model {base!r} (arch {arch!r}); "
                       f"its tags: {known}")


@functools.lru_cache(maxsize=None)
def input_defaults(arch: str) -> InputSpec:
    """The model's native input size and normalisation (module docstring)."""
    check_name(arch)
    source, name = _split(arch)
    if source == "timm":
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(name)
        if cfg is None:
            return InputSpec(224, None, None, False)
        return InputSpec(cfg.input_size[-1], tuple(cfg.mean), tuple(cfg.std), bool(cfg.fixed_input_size))
    import torchvision
    fixed = name.startswith(("vit_", "maxvit_"))
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return InputSpec(224, None, None, fixed)
    t = weights.transforms()
    return InputSpec(t.crop_size[0], tuple(t.mean), tuple(t.std), fixed)


def _size_kwargs(arch: str, input_size: int) -> dict:
    spec = input_defaults(arch)
    if not input_size or input_size == spec.size or not spec.fixed:
        return {}
    source, name = _split(arch)
    if source == "timm":
        return {"img_size": input_size}
    return {"image_size": input_size} if name.startswith("vit_") else {"input_size": (input_size, input_size)}


def build(arch: str, num_classes: int, input_size: int = 0) -> nn.Module:
    """The dense model, randomly initialised (never downloads weights)."""
    check_name(arch)
    source, name = _split(arch)
    kwargs = {"num_classes": num_classes, **_size_kwargs(arch, input_size)}
    try:
        if source == "timm":
            return _timm().create_model(name, pretrained=False, **kwargs)
        import torchvision
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise BipError(f"cannot build {arch} with {kwargs}: {err}") from None


def layer_names(arch: str, model: nn.Module) -> tuple[tuple[str, ...], str]:
    """(classifier module names, first conv name) where the model states them (timm), else
    ((), '') and the swap finds them by running the forward."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier, first = cfg.get("classifier") or (), cfg.get("first_conv") or ""
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    modules = dict(model.named_modules())  # a stale name (head replaced) is ignored
    return tuple(n for n in classifier if n in modules), first if first in modules else ""


class ResizeInput:
    """Forward pre-hook: images of another size are resized to ``size`` x ``size`` on the
    device (bilinear; antialiased when shrinking), before the first layer. Not part of the
    state dict; evaluation and MAC counting go through it too."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, module, args):
        x = args[0]
        if tuple(x.shape[-2:]) == (self.size, self.size):
            return None
        shrink = math.prod(x.shape[-2:]) > self.size * self.size
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                          antialias=shrink)
        return (x, *args[1:])
