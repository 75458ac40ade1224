"""Names that become paths: one charset, checked before any folder exists.

A run folder is ``<root>/<dataset>-<arch>-<stage>-<method>-<hash>/seed_<s>``; a grid's manifest is
``<root>/_grids/<name>.json``. Every piece that comes from the user is checked here first, so a
value such as ``../../x``, ``/etc``, ``''`` or ``a;rm -rf b`` is a one-line error, never a path.

- A *name* (dataset, arch, grid name) is ``[A-Za-z0-9_.-]+``, not ``.`` or ``..``, optionally with
  one ``prefix:`` (``tv:resnet18``, ``timm:vit_small_patch16_224``) whose prefix is ``[a-z]+``.
  ``safe_component`` maps the ``:`` to ``+`` for the folder name (``tv+resnet18``): a colon is a
  drive separator on Windows, a path list separator on POSIX, and ``+`` is outside the name charset,
  so two names can never share a folder.
- A *root* (run.result_dir, a grid's ``root:`` / ``--root``) is a path of such pieces (plus ``/``,
  ``~``, ``+``, ``,``, ``=``, ``@``): no whitespace, quotes or shell metacharacters, because it is
  written into sbatch scripts and job logs.

The catalogue of built-in architectures and datasets lives here too, readable without importing
torch: the registries (bip.models, bip.data) refuse to register a name missing from it, and a
test checks that nothing here is stale, so ``grid.py --dry-run`` validates every cell in half a
second. A ``prefix:name`` arch (another zoo's model) passes the charset check here and is
resolved by bip.models, which the launcher asks itself (it may import torch).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from bip.errors import BipError

_NAME = re.compile(r"(?:[a-z]+:)?[A-Za-z0-9_.-]+")
_ROOT = re.compile(r"[A-Za-z0-9_./~+,=@-]+")


def check_name(what: str, value: object, prefix: bool = True) -> str:
    """``value`` if it is a valid name (module docstring), else a one-line BipError;
    ``prefix=False`` also refuses the ``prefix:name`` form."""
    text = value if isinstance(value, str) else ""
    base = text.split(":", 1)[-1]
    if not _NAME.fullmatch(text) or base in (".", "..") or (":" in text and not prefix):
        raise BipError(f"{what}={value!r} is not a valid name: use letters, digits, '_', '.' and '-'"
                       + (" (optionally prefix:name)" if prefix else "") + ", not a path")
    return text


def safe_component(value: str, what: str = "name") -> str:
    """The folder-name form of a valid name: ``prefix:name`` -> ``prefix+name``."""
    return check_name(what, value).replace(":", "+")


def check_root_text(what: str, value: object) -> str:
    """The text of a root folder: non-empty, no whitespace / quotes / shell metacharacters."""
    text = value if isinstance(value, str) else ""
    if not _ROOT.fullmatch(text):
        raise BipError(f"{what}={value!r} is not a usable folder: use letters, digits and _ . - / ~ + , = @ "
                       "(no spaces, quotes or shell metacharacters)")
    return text


def check_root(what: str, value: str | Path, writable: bool = True) -> Path:
    """A root folder that exists as a directory or can be created: its nearest existing ancestor
    is a directory (a file or ``/dev/null/x`` is refused) and, with ``writable``, one this
    process may write to (read-only views such as ``grid.py --status`` pass False)."""
    path = Path(check_root_text(what, str(value))).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == path else f"is under {probe}, which is not a folder"
        raise BipError(f"{what}={str(value)!r} {where}")
    if writable and not os.access(probe, os.W_OK | os.X_OK):
        raise BipError(f"{what}={str(value)!r}: {probe} is not writable")
    return path


# -- the catalogue ------------------------------------------------------------------------------

MODELS = frozenset({
    "resnet20s", "resnet32s", "resnet44s", "resnet56s", "resnet110s",          # resnet_s.py
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",              # resnet_cifar.py
    "ResNet18", "ResNet34", "ResNet50",                                        # resnet_imagenet.py
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",  # vgg.py
    "wrn_28_10", "wrn_28_4", "wrn_34_10", "wrn_40_2",                          # wide_resnet.py
})
# The first and last conv / linear module of each built-in model (named_modules order): what
# prune.skip's aliases select, so a config can be canonicalised without building the model
# (tests/config/test_skip_ids.py checks them against the built models).
LAYER_ENDS = {name: ("features.0", "classifier") if name.startswith("vgg") else ("conv1", "fc")
              for name in MODELS}
DATASETS = frozenset({"CIFAR10", "CIFAR100", "TinyImageNet", "ImageNet", "ImageNetOrigin", "digits",
                      "synthetic"})
ZOO_PREFIXES = ("tv:", "timm:")  # archs of another model zoo (bip.models.external builds them)


def listed(kind: str, name: str) -> str:
    """Registries call this: a built-in name must be listed here (so the launcher knows it)."""
    if ":" not in name and name not in (MODELS if kind == "model" else DATASETS):
        raise ValueError(f"{kind} {name!r} is not listed in bip/config/names.py; add it there")
    return name


def check_arch(arch: str) -> None:
    """A built-in arch, or one with a zoo prefix (which only bip.models can resolve further)."""
    if arch.startswith(ZOO_PREFIXES):
        return
    if ":" in arch:
        raise BipError(f"unknown model zoo in arch {arch!r}; use one of: {', '.join(ZOO_PREFIXES)}")
    if arch not in MODELS:
        raise BipError(f"unknown arch {arch!r}; choose one of: {', '.join(sorted(MODELS))}")


def check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise BipError(f"unknown dataset {dataset!r}; choose one of: {', '.join(sorted(DATASETS))}")


# prune.skip's aliases: ``first`` is the first conv or linear layer, ``last`` = ``classifier`` the
# last one (bip.pruning.masking.resolve_skip). The canonical spelling names each selected layer by
# one token: ``first`` / ``classifier`` for the two ends (the documented spellings, so their run
# ids stay those of earlier releases), the module name otherwise; sorted, without repeats.
SKIP_FIRST, SKIP_LAST = "first", ("last", "classifier")


def canonical_skip(arch: str, skip: str) -> str:
    """``prune.skip`` spelled canonically for a built-in ``arch`` (``conv1``, ``first`` and
    ``first,conv1`` are all ``first`` on resnet20s); a zoo arch's ends are only known once the
    model is built, so its entries are only sorted here and masking.configure checks them."""
    entries = {s.strip() for s in skip.split(",") if s.strip()}
    ends = LAYER_ENDS.get(arch)
    if ends is not None:
        first, last = ends
        names = {first if e == SKIP_FIRST else last if e in SKIP_LAST else e for e in entries}
        entries = {SKIP_FIRST if n == first else SKIP_LAST[1] if n == last else n for n in names}
    return ",".join(sorted(entries))
