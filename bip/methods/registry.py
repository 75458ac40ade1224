"""The explicit table of methods: (stage or prune.method, variant) -> Method class."""
from __future__ import annotations

import torch.nn as nn

from bip.config import Config
from bip.errors import BipError
from bip.methods import imp_levels
from bip.methods.base import Method
from bip.methods.bilevel import BipPaper
from bip.methods.dense import Dense
from bip.methods.fused import BipFused
from bip.methods.hydra import Hydra
from bip.methods.imp import Imp
from bip.methods.oneshot import OneShot
from bip.methods.reference import BipReference, HydraReference

# prune.method -> {variant: class}; the variant is bip.variant for bip, prune.variant for hydra.
PRUNE_METHODS: dict[str, dict[str, type[Method]]] = {
    "bip": {"paper": BipPaper, "reference": BipReference, "fused": BipFused},
    "hydra": {"paper": Hydra, "reference": HydraReference},
    "omp": {"paper": OneShot},
    "random": {"paper": OneShot},
    "imp": {"paper": Imp},
}


def variant(cfg: Config) -> str:
    """The variant field that applies to this run's method (paper for the others)."""
    return {"bip": cfg.bip.variant, "hydra": cfg.prune.variant}.get(cfg.prune.method, "paper")


def create_method(cfg: Config, model: nn.Module, imp_source: imp_levels.Source | None = None) -> Method:
    """The Method for this run's stage and prune.method."""
    if cfg.run.stage in ("pretrain", "finetune"):
        return Dense(cfg, model)
    kind = PRUNE_METHODS.get(cfg.prune.method, {}).get(variant(cfg))
    if kind is None:
        raise BipError(f"unknown method {cfg.prune.method!r} (variant {variant(cfg)!r})")
    if kind is Imp:
        if imp_source is None:
            raise BipError("imp needs the source run's rewind.pt (written by pretrain)")
        return Imp(cfg, model, imp_source)
    return kind(cfg, model)
