"""IMP levels (the OpenLTH layout): one run per round, each a child of the round before.

A lineage is (dataset, arch, layer type, seed, prune.imp_rate, the pretrain and its rewind
point). Round 1 is a prune run whose parent is the pretrain; round r > 1 is a prune run whose
parent is round r - 1. Every round starts from its parent's published ``final.pt`` (trained
weights and mask), prunes the remaining weights by global magnitude down to its own
``prune.k``, rewinds the weights to the pretrain's ``rewind.pt`` and retrains
``train.epochs``. A round's density is ``(1 - rate)^r``, except that the last round of a
lineage lands exactly on the smallest requested k (a shortened step). So each round is a normal
run folder (result.json, mask.pt, final.pt, preemption, --only-failed) and every keep ratio that
passes through it reuses it.

This module is the shared arithmetic (densities, which round a requested k maps to) and what a
round reads from its parent's published outputs (round number, density, the rewind file).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from bip.config import identity
from bip.errors import BipError

TOLERANCE = 1e-9  # relative: 0.8 ** 3 is 0.5120000000000001, which is round 3 of k = 0.512


def rounds_for(k: float, rate: float) -> int:
    """Rounds of pruning ``rate`` of the remainder needed to reach density k (>= 1)."""
    # The schema refuses these already; a library caller gets the same one line, not a math error.
    if not 0 < rate < 1:
        raise BipError(f"prune.imp_rate={rate} is out of range (0, 1): IMP prunes a fraction of the remainder")
    if not 0 < k <= 1:
        raise BipError(f"imp: k={k} is out of range (0, 1]")
    return max(1, math.ceil(math.log(k) / math.log(1 - rate) - TOLERANCE))


def densities(k_min: float, rate: float) -> list[float]:
    """The densities of rounds 1..R of a lineage that ends at ``k_min`` (its last step
    shortened to land exactly on it)."""
    n = rounds_for(k_min, rate)
    # 12 significant digits: 0.8 ** 3 is the 0.512 a grid asks for, and ids stay stable.
    return [float(f"{(1 - rate) ** r:.12g}") for r in range(1, n)] + [k_min]


def round_of(k: float, series: list[float]) -> int:
    """The 1-based round a requested k maps to: the first whose density is <= k."""
    for r, density in enumerate(series, 1):
        if density <= k * (1 + TOLERANCE):
            return r
    raise BipError(f"imp: k={k} is below the lineage's last density {series[-1]}")


@dataclass(frozen=True)
class Source:
    """What a round takes from its parent: the parent's density (1.0 for a dense pretrain) and
    round (0 for the pretrain), and the rewind state (tensors)."""
    density: float
    round: int
    rewind: dict


def source(source_file: Path | None, parent_result: dict | None) -> tuple[float, int, Path]:
    """(parent density, parent round, rewind.pt path) for a round whose model source is
    ``source_file`` (a parent run's final.pt, or a file given with --source-net)."""
    if source_file is None:
        raise BipError("imp needs a source run (its rewind.pt holds the early weights)")
    if parent_result and parent_result.get("stage") == "prune" and parent_result.get("method") == "imp":
        density, round_ = float(parent_result["k"]), int(parent_result.get("imp_round") or 1)
    else:
        density, round_ = 1.0, 0
    path = _rewind_file(Path(source_file).parent) if round_ else Path(source_file).with_name(identity.REWIND)
    if not path.is_file():
        raise BipError(f"imp rewinds to the pretrain's early weights, but {path} does not exist "
                       "(pretrain writes it at train.rewind_epoch)")
    return density, round_, path


def _rewind_file(folder: Path) -> Path:
    """Walk up from an IMP round's folder (published config.yaml files) to the run the lineage
    started from; its rewind.pt."""
    for _ in range(100_000):  # a cycle is impossible (ids hash their parent); stop anyway
        try:
            doc = json.loads((folder / identity.CONFIG).read_text())
            cfg = doc["config"]
        except (OSError, ValueError, KeyError, TypeError):
            raise BipError(f"imp: cannot read {folder / identity.CONFIG} to find the lineage's rewind.pt") from None
        if cfg["run"]["stage"] != "prune" or cfg["prune"]["method"] != "imp":
            return folder / identity.REWIND
        if doc.get("parent_id"):
            folder = folder.parent.parent / doc["parent_id"] / folder.name
        else:
            return identity.source_file(cfg["run"]["source_net"]).with_name(identity.REWIND)
    raise BipError(f"imp: no end to the lineage above {folder}")


def check_step(k: float, rate: float, density: float, round_: int) -> None:
    """A round prunes at most ``rate`` of what its parent kept, and something."""
    if k >= density * (1 - TOLERANCE):
        raise BipError(f"imp round {round_ + 1}: k={k} must be below its source's density {density:g}")
    if k < (1 - rate) * density * (1 - TOLERANCE):
        raise BipError(f"imp round {round_ + 1}: k={k} prunes more than prune.imp_rate={rate} of the "
                       f"source's density {density:g} (at least {(1 - rate) * density:g}); IMP runs one "
                       "round per run: use a grid (method: imp, a list of k) or chain rounds with --source-net")
