"""The command line of ``python -m bip.train``: the seed README's flags plus ``section.key=value``."""
from __future__ import annotations

import argparse

from bip.config.load import load_config
from bip.config.schema import Config
from bip.errors import BipError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are a BipError (one line, exit 2), not a usage dump.
    Abbreviations are refused: ``--epoch`` must not silently mean ``--epochs`` (nor ``--lay``
    a layer type), since a later flag could make the abbreviation ambiguous or mean another."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise BipError(f"{self.prog}: {message}")


def argument_parser(prog: str = "bip-train") -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Pretrain, prune (BiP, HYDRA, OMP, IMP, random) or "
                "finetune one model. Flags of the original BiP README; any other field as "
                "section.key=value (e.g. bip.gamma=10 optim.wd=1e-4).")
    p.add_argument("--configs", action="append", default=[], metavar="YAML",
                   help="YAML preset(s), applied in order (e.g. configs/CIFAR10/bip.yml)")
    for flag, meta in [("--exp-mode", "pretrain|prune|finetune"), ("--trainer", "base|bilevel"),
                       ("--dataset", None), ("--k", "KEPT_FRACTION"), ("--source-net", "CKPT"),
                       ("--arch", None), ("--resume", "CKPT|RUN_DIR"), ("--layer-type", None),
                       ("--seed", None), ("--exp-name", None), ("--epochs", None),
                       ("--batch-size", None), ("--lr", None), ("--result-dir", "DIR"),
                       ("--data-dir", "DIR")]:
        p.add_argument(flag, metavar=meta)
    p.add_argument("--normalize", action="store_true", default=None)
    p.add_argument("--scaled-score-init", action="store_true", default=None,
                   help="scores start as a copy of the weights (first mask = global magnitude)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def config_from_argv(argv: list[str] | None = None) -> Config:
    # Intermixed: key=value overrides may stand before, between and after the flags.
    args = argument_parser().parse_intermixed_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("configs", "overrides") and v is not None}
    return load_config(args.configs, args.overrides, flags)
