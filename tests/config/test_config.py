"""Config loading: seed YAML layout, flat keys, coercion, precedence, one-line errors."""
from pathlib import Path

import pytest

from bip.config import Config, config_from_argv, load_config
from bip.errors import BipError

ROOT = Path(__file__).resolve().parents[2]
RUN_CONFIGS = sorted((ROOT / "configs").glob("*/*.yml"))
RUN_CONFIGS = [p for p in RUN_CONFIGS if p.parent.name != "grids"]


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_run_config_loads(path):
    cfg = load_config([path])
    assert cfg.run.stage == {"pretrain": "pretrain", "bip": "prune", "hydra": "prune",
                             "finetune": "finetune"}[path.stem]


def test_seed_keys_map_to_sections():
    cfg = load_config([ROOT / "configs/CIFAR10/bip.yml"])
    assert (cfg.prune.method, cfg.prune.layer_type, cfg.prune.k) == ("bip", "unstructured", 0.1)
    assert cfg.prune.score_init == "magnitude"             # scaled_score_init: True
    assert cfg.bip.lr2 == 1e-4 and isinstance(cfg.bip.lr2, float)  # YAML reads 1e-4 as a string
    assert cfg.optim.wd == 1e-4 and cfg.bip.mask_lr_schedule == "step"
    assert load_config([ROOT / "configs/CIFAR10/hydra.yml"]).prune.method == "hydra"
    assert load_config([ROOT / "configs/CIFAR100/pretrain.yml"]).model.num_classes == 100


def test_command_line_beats_yaml_beats_defaults(tmp_path):
    cfg = config_from_argv(["--configs", str(ROOT / "configs/CIFAR10/pretrain.yml"), "--epochs", "2",
                            "--arch", "resnet32s", "--seed", "7", "optim.wd=1e-3"])
    assert (cfg.train.epochs, cfg.model.arch, cfg.run.seed, cfg.optim.wd) == (2, "resnet32s", 7, 1e-3)
    assert cfg.optim.lr == 0.1 and cfg.data.normalize is True        # from the YAML
    assert cfg.data.val_fraction == Config().data.val_fraction       # default
    cfg = config_from_argv(["--exp-mode", "prune", "--trainer", "bilevel", "--layer-type", "filter",
                            "--k", "0.5", "--scaled-score-init", "--normalize"])
    assert (cfg.run.stage, cfg.prune.method, cfg.prune.layer_type, cfg.prune.k) == ("prune", "bip", "filter", 0.5)
    assert cfg.prune.score_init == "magnitude" and cfg.data.normalize


def test_nested_yaml_sections(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("optim:\n  lr: 2e-2\ntrain: {epochs: 3}\nk: 1\n")
    cfg = load_config([path])
    assert cfg.optim.lr == 0.02 and cfg.train.epochs == 3 and cfg.prune.k == 1.0


@pytest.mark.parametrize("overrides, message", [
    (["prune.kk=1"], "unknown config key 'prune.kk' (did you mean prune.k"),
    (["lr_shedule=cosine"], "did you mean lr_schedule"),
    (["prune.k=1.5"], "prune.k=1.5 is out of range (0.0, 1.0]"),
    (["prune.k=0"], "out of range"),
    (["train.epochs=2.5"], "train.epochs='2.5' is not a valid int"),
    (["data.normalize=maybe"], "not a valid bool"),
    (["prune.method=bipp"], "prune.method='bipp' is not valid; choose one of: hydra, bip"),
    (["trainer=fancy"], "trainer='fancy' is not valid"),
    (["prune.layer_type=unstructured"], "pretrain trains a dense model"),
    (["run.stage=prune"], "needs a pruned layer type"),
    (["noequals"], "expected section.key=value"),
    (["bip.gamma=0"], "bip.gamma must be > 0 (inf drops"),
    (["bip.variant=fast"], "bip.variant='fast' is not valid; choose one of: paper, reference, fused"),
])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(BipError) as err:
        load_config([], overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_files_and_flags(tmp_path):
    with pytest.raises(BipError, match="config file not found"):
        load_config([tmp_path / "missing.yml"])
    bad = tmp_path / "bad.yml"
    bad.write_text("arch: [unclosed\n")
    with pytest.raises(BipError, match="not valid YAML"):
        load_config([bad])
    with pytest.raises(BipError, match="unrecognized arguments|expected one argument"):
        config_from_argv(["--k"])


def test_replace_validates():
    cfg = Config()
    assert cfg.replace(**{"train.epochs": "5"}).train.epochs == 5
    with pytest.raises(BipError):
        cfg.replace(**{"prune.k": 2})


def test_bip_fused_variant_is_accepted():
    cfg = load_config([], ["run.stage=prune", "prune.layer_type=unstructured", "prune.method=bip",
                           "bip.variant=fused"])
    assert cfg.bip.variant == "fused"
