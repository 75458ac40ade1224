"""Non-finite losses, weights and scores stop a run (or are skipped up to a limit) without a host
sync per step; many trainings in one process; IMP's rewind must be complete."""
import json

import pytest
import torch
import torch.nn as nn

from bip.config import load_config
from bip.errors import BipError
from bip.pruning.layers import MaskedConv2d, MaskedLinear
from bip.methods import imp_levels as imp
from bip.methods.hydra import Hydra
from bip.methods.imp import Imp
from bip.train.nonfinite import NonFiniteError, NonFiniteGuard
from bip.testing.synccheck import SyncRecorder
from bip.train import train

TINY = ["data.dataset=synthetic", "data.synthetic_size=128", "data.batch_size=32", "train.epochs=2",
        "run.print_freq=1000"]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(MaskedConv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), MaskedLinear(8, 5))


def _batch(seed=0, nan=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 6, 6, generator=g)
    if nan:
        x[0, 0, 0, 0] = float("nan")
    return x, torch.randint(0, 5, (8,), generator=g)


def _hydra(limit: int):
    model = _model()
    cfg = load_config([], ["run.stage=prune", "prune.layer_type=unstructured", "prune.k=0.3",
                           f"train.max_nonfinite_steps={limit}"])
    method = Hydra(cfg, model)
    return model, method, NonFiniteGuard(model, method.optimizers.values(), limit, torch.device("cpu"))


def _step(method, guard, batch, step):
    guard.before_step()
    stats = method.step([batch], 0.0)
    guard.after_step(stats["loss"], step)


def test_a_bad_step_is_undone_on_the_device_and_counted():
    model, method, guard = _hydra(limit=1)
    _step(method, guard, _batch(0), 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = {id(p): s["momentum_buffer"].clone() for p, s in method.opt.state.items()}
    _step(method, guard, _batch(1, nan=True), 1)  # NaN input: NaN loss, grads, BN statistics
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights, scores, masks, BN statistics
    for p, s in method.opt.state.items():
        assert torch.equal(s["momentum_buffer"], momentum[id(p)])
    assert guard.check(epoch=0) == 1  # one skipped step is allowed
    _step(method, guard, _batch(2), 2)  # training goes on from the restored state
    assert not torch.equal(model.state_dict()["0.scores"], before["0.scores"])
    _step(method, guard, _batch(3, nan=True), 3)
    with pytest.raises(NonFiniteError, match=r"non-finite loss from step 2 \(2 bad step"):
        guard.check(epoch=0)


def test_a_bad_first_step_leaves_no_momentum_behind():
    model, method, guard = _hydra(limit=5)
    scores = model[0].scores.detach().clone()
    _step(method, guard, _batch(0, nan=True), 0)
    assert torch.equal(model[0].scores, scores)
    _step(method, guard, _batch(1), 1)
    reference, ref_method, ref_guard = _hydra(limit=5)
    _step(ref_method, ref_guard, _batch(1), 0)  # the same step as if the bad one never happened
    assert torch.equal(model[0].scores, reference[0].scores)


def test_a_non_finite_score_stops_the_run_although_the_loss_is_finite():
    model, method, guard = _hydra(limit=0)
    _step(method, guard, _batch(0), 0)
    with torch.no_grad():
        model[0].scores[0, 0, 0, 0] = float("nan")  # a pruned-or-not score: the loss stays finite
    _step(method, guard, _batch(1), 1)
    with pytest.raises(NonFiniteError, match=r"non-finite 0\.scores"):
        guard.check(epoch=0)


@pytest.mark.parametrize("limit", [0, 2])
def test_the_guard_never_syncs_the_host_on_a_step(limit):
    model, method, guard = _hydra(limit)
    _step(method, guard, _batch(0), 0)  # optimizer state exists
    with SyncRecorder() as rec:
        guard.before_step()
        guard.after_step(torch.tensor(float("nan")), 1)
    assert not rec.events, rec.summary()


def _poison_at(step: int, what: str = "weight"):
    def hook(event, info):
        if event == "step" and info["step"] == step:
            layer = next(m for m in info["model"].modules() if isinstance(m, nn.Conv2d))
            with torch.no_grad():
                getattr(layer, what).view(-1)[0] = float("nan")
    return hook


def test_a_diverged_run_stops_with_error_json_and_no_bad_checkpoint(tmp_path):
    cfg = load_config([], TINY + [f"run.result_dir={tmp_path}"])
    with pytest.raises(NonFiniteError, match="training diverged in epoch 2: non-finite loss from step 5"):
        train(cfg, tmp_path / "run", hook=_poison_at(4))  # 3 steps per epoch: epoch 2, step 5
    error = json.loads((tmp_path / "run" / "error.json").read_text())
    assert error["error"].startswith("NonFiniteError: training diverged")
    from bip.rundir import checkpoint  # the epoch-1 checkpoint is kept, finite
    ckpt = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                      if v.is_floating_point())


def test_many_trainings_in_one_process_with_other_precisions(tmp_path):
    """fp32 then bf16 then fp32 again in one process (accelerate fixes one precision per process)."""
    base = TINY + ["train.epochs=1", f"run.result_dir={tmp_path}"]
    fp32 = train(load_config([], base), tmp_path / "a")
    bf16 = train(load_config([], base + ["train.mixed_precision=bf16"]), tmp_path / "b")
    again = train(load_config([], base), tmp_path / "c")
    assert fp32["status"] == bf16["status"] == again["status"] == "done"
    losses = [json.loads((tmp_path / d / "metrics.jsonl").read_text())["train_loss"] for d in "abc"]
    assert losses[0] == losses[2] != losses[1]  # bf16 really ran in bf16, fp32 really in fp32


def test_imp_rejects_a_partial_rewind():
    model = _model()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = load_config([], ["run.stage=prune", "prune.layer_type=unstructured", "prune.method=imp",
                           "prune.k=0.8", "train.epochs=1"])
    Imp(cfg, _model(), imp.Source(1.0, 0, full))  # scores and masks are the run's own: not needed
    partial = {k: v for k, v in full.items() if k != "1.running_var"}
    with pytest.raises(BipError, match=r"rewind.pt does not fit this model: missing 1\.running_var"):
        Imp(cfg, _model(), imp.Source(1.0, 0, partial))
    with pytest.raises(BipError, match="unexpected extra.weight"):
        Imp(cfg, _model(), imp.Source(1.0, 0, {**full, "extra.weight": torch.zeros(1)}))
    with pytest.raises(BipError, match=r"wrong shape 5\.bias"):
        Imp(cfg, _model(), imp.Source(1.0, 0, {**full, "5.bias": torch.zeros(3)}))


def test_superseding_a_run_moves_its_rewind_point(tmp_path):
    from bip.config import identity
    from launch import status
    (tmp_path / identity.REWIND).write_bytes(b"x")
    (tmp_path / identity.RESULT).write_text("{}")
    target = status.supersede(tmp_path)
    assert (target / identity.REWIND).is_file() and not (tmp_path / identity.REWIND).exists()

