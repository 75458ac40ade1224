"""train.log_with: the per-epoch metrics (and compute) of metrics.jsonl go to a tracker, one
tracker run per bip run, main rank only, outside the run identity; a missing extra is one line."""
import importlib.util
import json

import pytest

from bip.config import identity
from bip.config import load_config
from bip.train import main, train

TINY = ["data.dataset=synthetic", "data.synthetic_size=128", "data.batch_size=32", "train.epochs=2",
        "model.arch=resnet20s", "data.num_workers=0", "train.steps_per_epoch=2"]


def test_log_with_is_not_part_of_the_run_identity():
    plain = load_config([], TINY)
    assert identity.run_id(plain) == identity.run_id(load_config([], TINY + ["train.log_with=tensorboard"]))


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard extra not installed")
def test_tensorboard_gets_every_epoch_row(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = load_config([], TINY + [f"run.result_dir={tmp_path}", "train.log_with=tensorboard",
                                  "run.exp_name=mygrid"])
    result = train(cfg)
    folder = identity.run_dir(cfg)
    rows = [json.loads(line) for line in (folder / identity.METRICS).read_text().splitlines()]
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    for key in ("test_acc", "val_acc", "train_loss", "train_passes", "train_flops"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["epoch"], pytest.approx(float(r[key]), rel=1e-6)) for r in rows], key
    assert rows[-1]["train_passes"] == result["train_passes"] == 2 * 2 * 32
    assert "grid" in "".join(events.Tags()["tensors"])


def test_a_missing_tracker_library_is_one_line_and_touches_nothing(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code = main(["--dataset", "synthetic", "--result-dir", str(tmp_path / "r"), "train.log_with=wandb",
                 "data.synthetic_size=128"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: train.log_with=wandb needs the wandb package: "
                                 "pip install -e '.[wandb]' (or train.log_with=none)"]
    assert not (tmp_path / "r").exists()


def test_an_unknown_tracker_is_a_config_error():
    from bip.errors import BipError
    with pytest.raises(BipError, match="train.log_with='mlflow' is not valid; choose one of: none, tensorboard, wandb"):
        load_config([], TINY + ["train.log_with=mlflow"])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb extra not installed")
def test_wandb_logs_offline_into_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # bip defaults to offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config([], TINY + [f"run.result_dir={tmp_path}", "train.log_with=wandb", "run.exp_name=mygrid"])
    train(cfg)
    runs = list((identity.run_dir(cfg) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
