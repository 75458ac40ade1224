"""The command line of ``python -m bip.train`` / ``bip-train``: the original BiP README's flags
(``--configs --exp-mode --k ...``) plus ``section.key=value``; the last line it prints is the run folder."""
from __future__ import annotations

import os
import signal
import sys

from bip.config import Config, config_from_argv, identity, names
from bip.errors import BipError
from bip.models import model_builder
from bip.rundir.boundary import Interrupted, install_stop_signals, restore_signals, stop_reason
from bip.train.loop import train
from bip.train.sources import resolve


def check_names(cfg: Config) -> None:
    """Registry names and the result folder, before anything is written: a typo in --arch,
    --dataset or --result-dir creates no folder (bip.config.names checked the charset already)."""
    model_builder(cfg.model.arch)
    names.check_dataset(cfg.data.dataset)
    names.check_root("run.result_dir", cfg.run.result_dir)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (scancel, Slurm preemption, kill) and USR2 (sbatch --signal): save, then exit.
    previous = install_stop_signals(signal.SIGTERM, signal.SIGUSR2)
    try:
        return _main(argv)
    finally:
        restore_signals(previous)


def _main(argv: list[str] | None) -> int:
    try:
        cfg = config_from_argv(argv)
        check_names(cfg)
        cfg = resolve(cfg)
        run_dir = identity.run_dir(cfg)
        result = train(cfg, run_dir)
    except BipError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted:
        print(f"stopped ({stop_reason()}); the same command resumes {run_dir}", file=sys.stderr)
        return 128 + getattr(signal, stop_reason() or "SIGTERM", signal.SIGTERM)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"test_acc {result['test_acc']:.2f}", file=sys.stderr)
        print(run_dir, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
