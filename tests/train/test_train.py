"""The training loop and CLI: seed-README commands, exact resume, run files, one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bip.rundir import checkpoint
from bip.config import identity
from bip.pruning import masking
from bip.config import load_config
from bip.train import main, train
from helpers import TINY

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "bip.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


SMALL = ["data.synthetic_size=1024", "data.batch_size=64"]  # 2 epochs of 16 steps: ~90% here


def test_smoke_command_writes_a_run_folder(tmp_path):
    proc = cli("--configs", "configs/CIFAR10/pretrain.yml", "--arch", "resnet20s", "--dataset",
               "synthetic", "--epochs", "2", "--seed", "1", "--exp-name", "smoke",
               "--result-dir", str(tmp_path), *SMALL)
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])  # the last line is the run folder
    assert run_dir.parent.parent == tmp_path and run_dir.name == "seed_1"
    result = json.loads((run_dir / "result.json").read_text())
    for key in ("test_acc", "val_acc", "epochs", "wall_time_s", "status"):
        assert key in result
    assert result["status"] == "done" and result["epochs"] == 2
    assert result["test_acc"] > 30  # chance is 10% on the 10-class synthetic data
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["config"]["run"]["exp_name"] == "smoke" and "git_sha" in config["provenance"]
    # done means done: the same command trains nothing and prints the same folder
    again = cli("--configs", "configs/CIFAR10/pretrain.yml", "--arch", "resnet20s", "--dataset",
                "synthetic", "--epochs", "2", "--seed", "1", "--result-dir", str(tmp_path), *SMALL)
    assert again.stdout.strip().splitlines()[-1] == str(run_dir)


class Kill(Exception):
    pass


@pytest.mark.parametrize("stage", ["pretrain", "bip"])
def test_resume_after_a_kill_is_bit_identical(tmp_path, stage):
    overrides = TINY + [f"run.result_dir={tmp_path}"]
    if stage == "bip":
        pre = load_config([], overrides)
        train(pre)
        overrides += ["run.stage=prune", "prune.method=bip", "prune.layer_type=unstructured",
                      "prune.k=0.2", f"run.parent={identity.run_id(pre)}"]
    cfg = load_config([], overrides)
    full = train(cfg, tmp_path / "full")

    def kill_after_first_epoch(event, info):
        if event == "epoch" and info["epoch"] == 1:
            raise Kill()
    with pytest.raises(Kill):
        train(cfg, tmp_path / "killed", hook=kill_after_first_epoch)
    assert (tmp_path / "killed" / "error.json").is_file()
    resumed = train(cfg, tmp_path / "killed")
    assert not (tmp_path / "killed" / "error.json").exists()
    a = checkpoint.load(tmp_path / "full" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "killed" / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert resumed["test_acc"] == full["test_acc"]
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def _run(*argv):
    assert main(list(argv)) == 0


def _last_dir(capsys):
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def test_seed_readme_pipeline(tmp_path, capsys):
    """The README's commands, with python -m bip.train for python3 train.py (resnet20s for speed)."""
    common = ["--arch", "resnet20s", "--dataset", "synthetic", "--seed", "1234",
              "--result-dir", str(tmp_path), "data.synthetic_size=256", "data.batch_size=32"]
    _run("--k", "1.0", "--configs", "configs/CIFAR10/pretrain.yml", "--epochs", "2", *common,
         "--exp-name", "CIFAR10_resnet18_Pretrain")
    pretrained = _last_dir(capsys) / "checkpoint.pt"
    for trainer, config in (("bilevel", "bip.yml"), ("base", "hydra.yml")):
        for layer_type, k in (("unstructured", 0.01), ("channel", 0.5), ("filter", 0.5)):
            _run("--exp-mode", "prune", "--configs", f"configs/CIFAR100/{config}", "--layer-type",
                 layer_type, "--k", str(k), "--source-net", str(pretrained), "--epochs", "1",
                 "--trainer", trainer, *common, "model.num_classes=10", "--exp-name", "x")
            pruned = _last_dir(capsys)
            result = json.loads((pruned / "result.json").read_text())
            units = result["sparsity"]["total"]
            assert result["sparsity"]["kept"] >= masking.keep_count(k, units) and result["method"] == (
                "bip" if trainer == "bilevel" else "hydra")
            if layer_type == "unstructured":
                assert result["sparsity"]["kept"] == masking.keep_count(k, units)
                assert abs(result["sparsity"]["kept_fraction"] - k) < 1 / units
            assert (pruned / "mask.pt").is_file()
            _run("--exp-mode", "finetune", "--configs", "configs/CIFAR10/finetune.yml", "--layer-type",
                 layer_type, "--k", str(k), "--source-net", str(pruned / "checkpoint.pt"),
                 "--epochs", "1", *common)
            tuned = _last_dir(capsys)
            tuned_result = json.loads((tuned / "result.json").read_text())
            assert tuned_result["sparsity"]["kept"] == result["sparsity"]["kept"]
            assert tuned_result["method"] == result["method"] and "finetune" in tuned.parent.name


def test_finetune_rejects_another_layer_type_or_k(tmp_path, capsys):
    base = TINY + [f"run.result_dir={tmp_path}", "train.epochs=1"]
    pre = load_config([], base)
    train(pre)
    prune = load_config([], base + ["run.stage=prune", "prune.method=omp", "prune.layer_type=filter",
                                    "prune.k=0.5", f"run.parent={identity.run_id(pre)}"])
    train(prune)
    source = identity.run_dir(prune) / "checkpoint.pt"
    capsys.readouterr()
    for layer_type, k in (("unstructured", 0.5), ("filter", 0.3)):
        rc = main(["--exp-mode", "finetune", "--layer-type", layer_type, "--k", str(k),
                   "--source-net", str(source), *[f"{o}" for o in base]])
        assert rc == 2
        err = capsys.readouterr().err.strip()
        assert "finetune must keep the source's mask" in err and len(err.splitlines()) == 1


BAD_INPUTS = {
    "unknown arch": (["--arch", "resnet19"], "unknown arch 'resnet19'"),
    "unknown dataset": (["--dataset", "CIFAR11"], "unknown dataset 'CIFAR11'"),
    "unknown key": (["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    "k above 1": (["--exp-mode", "prune", "--layer-type", "unstructured", "--k", "1.5"], "out of range"),
    "k of 0": (["--exp-mode", "prune", "--layer-type", "unstructured", "--k", "0"], "out of range"),
    "missing source": (["--exp-mode", "prune", "--layer-type", "unstructured", "--k", "0.1",
                        "--source-net", "/nonexistent/ckpt.pt"], "--source-net file not found"),
    "missing data": (["--dataset", "CIFAR10", "--data-dir", "/nonexistent"], "never downloaded"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_and_nonzero(tmp_path, name, capsys):
    args, message = BAD_INPUTS[name]
    assert main(["--result-dir", str(tmp_path), "--epochs", "1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_corrupted_checkpoint_cli_exit_code(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    proc = cli("--exp-mode", "prune", "--layer-type", "unstructured", "--k", "0.1", "--source-net",
               str(bad), "--dataset", "synthetic", "--result-dir", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: source checkpoint {bad} is corrupt or not a torch checkpoint (BadZipFile)"] or \
        "is corrupt" in proc.stderr.strip().splitlines()[-1]
    assert len(proc.stderr.strip().splitlines()) == 1


def test_one_shot_runs_train_nothing(tmp_path):
    base = TINY + [f"run.result_dir={tmp_path}", "train.epochs=1"]
    pre = load_config([], base)
    train(pre)
    cfg = load_config([], base + ["run.stage=prune", "prune.method=omp", "prune.layer_type=unstructured",
                                  "prune.k=0.3", f"run.parent={identity.run_id(pre)}"])
    result = train(cfg)
    assert result["epochs"] == 0 and abs(result["sparsity"]["kept_fraction"] - 0.3) < 1e-5
    assert result["params_effective"] < result["params_dense"]
    assert result["macs_effective"] < result["macs_dense"]
