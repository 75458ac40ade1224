"""The collapse and BiP-vs-IMP benchmarks build the runs they claim (no training here):
benchmarks/collapse_table.py's pretrain is the README command line's run, every cell of its
table is a valid config with the protection it names, its finetunes keep the prune run's mask
rules; benchmarks/bip_vs_imp.py's grid expands as documented and its compute count adds a
run's passes to its ancestors'."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from bip.config import identity
from bip.config import config_from_argv, load_config

REPO = Path(__file__).resolve().parents[2]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_collapse_table_pretrain_is_the_readme_command(tmp_path):
    table = _module("collapse_table")
    files, over = table.pretrain_job(tmp_path, 1234, 15)
    cli = config_from_argv(["--k", "1.0", "--arch", "resnet20s", "--configs", str(REPO / "configs/CIFAR10/pretrain.yml"),
                            "--dataset", "digits", "--epochs", "15", "--seed", "1234", "--batch-size", "64",
                            "--result-dir", str(tmp_path)])
    assert identity.run_id(load_config(files, over)) == identity.run_id(cli)


def test_collapse_table_cells_carry_their_protection(tmp_path):
    table = _module("collapse_table")
    jobs = dict(table.prune_jobs(tmp_path, 1, "PARENT", [0.05, 0.01], 3, "10", list(table.METHODS)))
    assert len(jobs) == 3 * 4 * 2
    ids = set()
    for (method, setting, k, seed), (files, over) in jobs.items():
        cfg = load_config(files, over)
        assert (cfg.prune.method, cfg.prune.k, cfg.train.epochs) == ("hydra" if method == "hydra" else "bip", k, 3)
        assert cfg.bip.variant == ("reference" if "reference" in method else "paper")
        assert cfg.prune.min_layer_keep == (10 if "floor" in setting else 0)
        assert cfg.prune.skip == ("classifier,first" if "skip" in setting else "")
        ids.add(identity.run_id(cfg))
        ft = load_config(*table.finetune_job(tmp_path, 1, over, "PRUNE", 1))
        assert (ft.run.stage, ft.prune.k, ft.prune.skip, ft.prune.min_layer_keep) == \
            ("finetune", k, cfg.prune.skip, cfg.prune.min_layer_keep)
    assert len(ids) == len(jobs)  # every cell is its own run


def test_bip_vs_imp_grid_expands_as_documented(tmp_path):
    from launch.sweep import load_grid

    plan = load_grid(REPO / "configs/grids/digits_bip_vs_imp.yml", tmp_path)
    assert plan.cells == 32
    assert {s: len(r) for s, r in plan.runs.items()} == {"pretrain": 2, "prune": 24 + 2 * 21, "finetune": 16}
    epochs = {(r.cfg.prune.method, r.cfg.train.epochs) for r in plan.runs["prune"]}
    assert epochs == {("bip", 2), ("hydra", 2), ("omp", 1), ("imp", 1)}  # imp: 1 per round, 21 rounds
    assert {r.cfg.prune.min_layer_keep for r in plan.runs["prune"]} == {10}
    assert {(r.cfg.train.epochs, r.cfg.train.rewind_epoch) for r in plan.runs["pretrain"]} == {(15, 15)}


def test_bip_vs_imp_counts_lineage_passes():
    bench = _module("bip_vs_imp")
    rows = [  # run_id, parent_id, stage, method, epochs
        ("pre", "", "pretrain", "dense", 15), ("b", "pre", "prune", "bip", 2),
        ("h", "pre", "prune", "hydra", 2), ("hf", "h", "finetune", "hydra", 1),
        ("o", "pre", "prune", "omp", 0), ("i", "pre", "prune", "imp", 21)]
    df = pd.DataFrame([dict(run_id=r, parent_id=p, stage=s, method=m, epochs=e, seed=1, **{"bip.variant": "paper"})
                       for r, p, s, m, e in rows])
    got = bench.lineage_passes(df)
    assert got == {("pre", 1): 15, ("b", 1): 19, ("h", 1): 17, ("hf", 1): 18, ("o", 1): 15, ("i", 1): 36}
    df.loc[df["run_id"] == "b", "bip.variant"] = "reference"
    with pytest.raises(SystemExit):
        bench.lineage_passes(df)


def test_bip_vs_imp_answers_a_requested_k_with_the_first_imp_round_below_it():
    bench = _module("bip_vs_imp")
    rounds = {("imp", round(0.8 ** r, 12), 1): f"round {r}" for r in range(1, 12)}
    got = bench._imp_at_requested_k({("bip", 0.1, 1): "bip", ("bip", 0.512, 1): "bip", **rounds})
    assert got == {("bip", 0.1, 1): "bip", ("bip", 0.512, 1): "bip",
                   ("imp", 0.1, 1): "round 11", ("imp", 0.512, 1): "round 3"}
