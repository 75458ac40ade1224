"""Run folders written by commit 37efb6d (tests/fixtures/runs-v1, bip-checkpoint-1) read as they
did: the finished one is done and returned without training; the interrupted one resumes from its
v1 checkpoint and publishes what 37efb6d published (same test accuracy, same final.pt tensors)."""
import hashlib
import json
import shutil
from pathlib import Path

import torch

from bip.config import identity, load_config
from bip.rundir import checkpoint
from bip.rundir import folder as runfolder
from bip.train import train
from bip.train.state import TrainState

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "runs-v1"
TINY = ["data.dataset=synthetic", "data.synthetic_size=128", "data.batch_size=32", "data.num_workers=0"]


def _configs(root: Path):
    pre = load_config([], TINY + [f"run.result_dir={root}", "train.epochs=1"])
    prune = load_config([], TINY + [f"run.result_dir={root}", "train.epochs=2", "run.stage=prune",
                                    "prune.method=hydra", "prune.layer_type=unstructured", "prune.k=0.2",
                                    f"run.parent={identity.run_id(pre)}"])
    return pre, prune


def _digest(path: Path) -> str:
    state = torch.load(path, weights_only=True)["model"]
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_a_finished_v1_run_is_done_and_is_not_retrained(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "runs")
    pre, _ = _configs(tmp_path / "runs")
    folder = identity.run_dir(pre)
    assert folder.is_dir() and runfolder.inspect(folder).state == "done"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert train(pre)["status"] == "done"
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_an_interrupted_v1_run_resumes_to_the_result_37efb6d_published(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "runs")
    _, prune = _configs(tmp_path / "runs")
    folder = identity.run_dir(prune)
    assert runfolder.inspect(folder).state == "started"
    assert checkpoint.load(folder / identity.CHECKPOINT)["format"] == "bip-checkpoint-1"
    expected = json.loads((FIXTURE / "expected.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(expected["threads"])  # as 37efb6d resumed it: CPU sums depend on the count
    try:
        result = train(prune)
    finally:
        torch.set_num_threads(threads)
    assert result["run_id"] == expected["run_id"]
    assert result["test_acc"] == expected["test_acc"]
    assert _digest(folder / identity.FINAL) == expected["model_sha256"]
    assert checkpoint.load(folder / identity.CHECKPOINT)["format"] == checkpoint.FORMAT == "bip-checkpoint-2"


def test_a_v1_epoch_end_checkpoint_without_mid_epoch_fields_loads(tmp_path):
    """The v1 loader fills what an epoch-end checkpoint of that format may lack; v2 requires it."""
    ckpt = checkpoint.load(FIXTURE / "synthetic-resnet20s-prune-hydra-86473b047f/seed_1234/checkpoint.pt")
    for key in ("step_in_epoch", "totals", "epoch_time_s", "nonfinite_steps", "compute"):
        ckpt.pop(key)

    class _Method:  # the parts of a Method that from_checkpoint touches
        core = torch.nn.Module()

        def load_state_dict(self, state):
            pass
    _Method.core.load_state_dict = lambda state: None
    state = TrainState.from_checkpoint(ckpt, Path("v1.pt"), _Method())
    assert (state.epoch, state.step, state.step_in_epoch, state.totals) == (ckpt["epoch"], ckpt["step"], 0, {})
    ckpt["format"] = "bip-checkpoint-2"
    import pytest
    from bip.errors import BipError
    with pytest.raises(BipError, match="lacks step_in_epoch"):
        TrainState.from_checkpoint(ckpt, Path("v2.pt"), _Method())
