"""The collapse and BiP-vs-IMP benchmarks build the runs they claim (no training here):
benchmarks/collapse_table.py's pretrain is the README command line's run, every cell of its
table is a valid config with the protection it names, its finetunes keep the prune run's mask
rules; benchmarks/bip_vs_imp.py's grid expands as documented and its compute count adds a
run's passes to its ancestors'."""
from __future__ import annotations

import importlib.util
import json
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
    assert plan.cells == 7 * 4 * 3
    # prune: (bip, bip+clip, hydra, hydra+clip, omp, random) x 4 k x 3 seeds + 21 IMP rounds per seed
    assert {s: len(r) for s, r in plan.runs.items()} == {"pretrain": 3, "prune": 6 * 12 + 3 * 21, "finetune": 4 * 12}
    epochs = {(r.cfg.prune.method, r.cfg.prune.score_step_clip, r.cfg.train.epochs) for r in plan.runs["prune"]}
    assert epochs == {("bip", 0, 5), ("bip", 0.01, 5), ("hydra", 0, 5), ("hydra", 0.01, 5),
                      ("omp", 0, 5), ("random", 0, 5), ("imp", 0, 5)}
    assert {r.cfg.prune.min_layer_keep for r in plan.runs["prune"]} == {10}
    assert {r.cfg.train.epochs for r in plan.runs["finetune"]} == {5}  # the same budget for every finetune
    assert {(r.cfg.train.epochs, r.cfg.train.rewind_epoch) for r in plan.runs["pretrain"]} == {(20, 20)}


def test_bip_vs_imp_pairs_each_arm_with_its_final_model():
    bench = _module("bip_vs_imp")
    clip = json.dumps({"prune.score_step_clip": 0.01})
    rows = [  # run_id, parent_id, stage, method, k, hashed, acc, lineage passes
        ("pre", "", "pretrain", "dense", 1.0, "", 98.0, 20), ("b", "pre", "prune", "bip", 0.1, "", 90.0, 40),
        ("bc", "pre", "prune", "bip", 0.1, clip, 95.0, 40), ("h", "pre", "prune", "hydra", 0.1, "", 10.0, 30),
        ("hf", "h", "finetune", "hydra", 0.1, "", 80.0, 40), ("o", "pre", "prune", "omp", 0.1, "", 9.0, 20),
        ("of", "o", "finetune", "omp", 0.1, "", 85.0, 30)]
    df = pd.DataFrame([dict(run_id=r, parent_id=p, stage=s, method=m, k=k, hashed=h, seed=1, status="done",
                            test_acc_at_best_val=a, lineage_train_passes=c) for r, p, s, m, k, h, a, c in rows])
    df["fixed"] = [bool(h) for h in df["hashed"]]
    fin = bench.final_rows(df)
    assert {key: r["run_id"] for key, r in fin.items()} == {
        ("bip", False, 0.1, 1): "b", ("bip", True, 0.1, 1): "bc", ("hydra", False, 0.1, 1): "hf",
        ("omp", False, 0.1, 1): "of"}
    points, lines = bench.report(df)
    assert points[(("omp", False), 0.1)] == (85.0, 0.0, 30.0)  # the finetune's accuracy and lineage
    assert any(line.startswith("| BiP + clip - OMP + ft | +10.0") for line in lines)


def test_bip_vs_imp_answers_a_requested_k_with_the_first_imp_round_below_it():
    bench = _module("bip_vs_imp")
    rounds = {("imp", round(0.8 ** r, 12), 1): f"round {r}" for r in range(1, 12)}
    rounds = {("imp", False, k, s): v for (_, k, s), v in rounds.items()}
    got = bench._imp_at_requested_k({("bip", False, 0.1, 1): "bip", ("bip", True, 0.512, 1): "bip", **rounds})
    assert got == {("bip", False, 0.1, 1): "bip", ("bip", True, 0.512, 1): "bip",
                   ("imp", False, 0.1, 1): "round 11", ("imp", False, 0.512, 1): "round 3"}
