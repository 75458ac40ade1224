"""The mask-dynamics options of score-based methods (prune.refresh_every, hysteresis, ramp_epochs,
score_step_clip), the mask monitor (run.diagnostics), eval.bn_recalibrate and eval.select: each
does what its docs say, and none changes a run that does not set it."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from bip.config import identity, load_config
from bip.methods.registry import create_method
from bip.models import create_model
from bip.pruning import masking
from bip.pruning.monitor import magnitude_masks
from bip.train import train
from bip.train.evaluate import recalibrate_bn
from helpers import TINY, image_batches, method_config


def _method(name: str, extra=(), seed: int = 0):
    torch.manual_seed(seed)
    cfg = method_config(name, "unstructured", extra)
    model = create_model("resnet20s", 10, "unstructured")
    return create_method(cfg, model), model


def _masks(model):
    return [m.mask.clone() for _, m in masking.masked_layers(model)]


def _kept(model) -> int:
    return sum(int(m.mask.sum()) for _, m in masking.masked_layers(model))


def test_ramp_keeps_round_k_t_n_at_every_step():
    k, T, steps = 0.1, 1.0, 6
    m, model = _method("hydra", [f"prune.k={k}", f"prune.ramp_epochs={T}"])
    n = masking.plan(model).n_unstructured
    assert _kept(model) == n  # the ramp starts dense
    for i, batch in enumerate(image_batches(steps)):
        progress = (i + 1) / (steps - 2)  # reaches past T: the last steps keep k
        m.step([batch], progress)
        k_t = masking.ramp_k(k, progress, T)
        assert _kept(model) == masking.keep_count(k_t, n)
    assert _kept(model) == masking.keep_count(k, n)
    assert masking.ramp_k(k, 0.5, 1.0) == pytest.approx(k + (1 - k) * 0.125)


def test_refresh_every_changes_the_mask_only_on_its_steps():
    m, model = _method("hydra", ["prune.refresh_every=3", "optim.lr=1.0"])
    before, changed = _masks(model), []
    for batch in image_batches(6):
        m.step([batch], 0.0)
        now = _masks(model)
        changed.append(any(not torch.equal(a, b) for a, b in zip(before, now)))
        before = now
    assert changed == [False, False, True, False, False, True]


def test_hysteresis_keeps_a_kept_weight_against_a_slightly_larger_one():
    lin = create_model("resnet20s", 10, "unstructured")
    cfg = method_config("hydra", "unstructured", ["prune.hysteresis=0.5"])
    masking.configure(lin, cfg.prune)
    layers = [m for _, m in masking.masked_layers(lin)]
    with torch.no_grad():
        for m in layers:
            m.scores.fill_(0.0)
        a, b = layers[0].scores.view(-1), layers[1].scores.view(-1)
        a[0] = 1.0
        masking.refresh_masks(lin, 1 / masking.plan(lin).n_unstructured)  # keeps 1 weight: a[0]
        assert layers[0].mask.view(-1)[0]
        b[0] = 1.2  # 20 % larger: below the 50 % margin
        masking.refresh_masks(lin, 1 / masking.plan(lin).n_unstructured)
        assert layers[0].mask.view(-1)[0] and not layers[1].mask.view(-1)[0]
        b[0] = 1.6  # beyond the margin: it enters
        masking.refresh_masks(lin, 1 / masking.plan(lin).n_unstructured)
        assert layers[1].mask.view(-1)[0] and not layers[0].mask.view(-1)[0]


@pytest.mark.parametrize("name", ["hydra", "bip", "bip-fused"])
def test_score_step_clip_bounds_each_layers_step(name):
    c = 1e-3
    lr = ["optim.lr=10", "optim.momentum=0", "optim.wd=0"] if name == "hydra" else \
         ["bip.beta=10", "bip.momentum=0", "bip.upper_wd=0"]
    m, model = _method(name, [f"prune.score_step_clip={c}", *lr])
    before = [s.detach().clone() for s in m.scores]
    m.step(image_batches(m.streams), 0.0)
    for s, s0 in zip(m.scores, before):
        assert float((s.detach() - s0).norm()) <= c * float(s0.norm()) * (1 + 1e-5)
    free, _ = _method(name, lr)
    free.step(image_batches(free.streams), 0.0)
    ratios = [float((s.detach() - s0).norm() / s0.norm()) for s, s0 in zip(free.scores, before)]
    assert max(ratios) > 10 * c  # the bound binds: without it, steps are far larger


def _tiny_run(tmp_path, name: str, extra=()):
    pre = load_config([], [*TINY, "run.stage=pretrain", f"run.result_dir={tmp_path}"])
    src = identity.run_dir(pre, tmp_path)
    if not (src / identity.RESULT).exists():
        train(pre, src)
    prune = method_config(name, "unstructured", [*TINY, f"run.result_dir={tmp_path}",
                                                 f"run.source_net={src / identity.FINAL}", *extra])
    run_dir = identity.run_dir(prune, tmp_path)
    result = train(prune, run_dir)
    rows = [json.loads(line) for line in (run_dir / identity.METRICS).read_text().splitlines()]
    return result, rows, run_dir


@pytest.mark.parametrize("name,extra", [("hydra", []), ("bip", []), ("bip-reference", []),
                                        ("hydra", ["prune.variant=reference"])])
def test_a_run_logs_the_mask_metrics(tmp_path, name, extra):
    result, rows, _ = _tiny_run(tmp_path, name, ["run.diagnostics=step", *extra])
    for row in rows:
        for key in ("mask_churn_epoch", "mask_churn_start", "mask_overlap_magnitude", "bn_drift",
                    "mask_churn_step", "score_step_ratio", "mask_layers"):
            assert key in row, key
        assert 0 <= row["mask_churn_start"] <= 1 and 0 <= row["mask_overlap_magnitude"] <= 1
        assert sum(v[0] for v in row["mask_layers"].values()) == result["sparsity"]["kept"]
        assert sum(v[1] for v in row["mask_layers"].values()) == result["sparsity"]["kept"]
    if name == "bip":
        assert "lower_loss" in rows[0]
    assert rows[0]["score_step_ratio"] > 0


@pytest.mark.parametrize("name,zero", [("hydra", ["optim.lr=0", "prune.train_bn=false"]),
                                       ("bip", ["bip.beta=0"])])
def test_churn_is_zero_when_the_score_lr_is_zero(tmp_path, name, zero):
    _, rows, _ = _tiny_run(tmp_path, name, ["run.diagnostics=step", *zero])
    for row in rows:
        assert row["mask_churn_step"] == 0 and row["mask_churn_epoch"] == 0 and row["mask_churn_start"] == 0
        assert row["mask_overlap_magnitude"] == 1.0  # magnitude init: the start mask IS the magnitude mask
        assert row["score_step_ratio"] == 0


def test_magnitude_masks_leave_scores_and_masks_alone():
    m, model = _method("hydra", ["prune.score_init=kaiming"])
    scores = [s.detach().clone() for s in m.scores]
    masks = _masks(model)
    mag = magnitude_masks(model, 0.3)
    assert all(torch.equal(a, b.detach()) for a, b in zip(scores, m.scores))
    assert all(torch.equal(a, b) for a, b in zip(masks, _masks(model)))
    weights = torch.cat([mm.weight.detach().abs().flatten() for _, mm in masking.masked_layers(model)])
    threshold = weights.sort(descending=True).values[masking.keep_count(0.3, weights.numel()) - 1]
    kept = torch.cat([x.flatten() for x in mag])
    assert int(kept.sum()) == masking.keep_count(0.3, weights.numel())
    assert bool((weights[kept] >= threshold).all())


def test_bn_recalibration_changes_running_stats_only():
    torch.manual_seed(0)
    model = create_model("resnet20s", 10, "unstructured")
    masking.refresh_masks(model, 0.3)
    batches = image_batches(3, batch=8)
    params = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    seen = recalibrate_bn(model, iter(batches), 2, method_config("hydra", "unstructured"))
    assert seen == 16
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in params.items())  # weights, scores, masks
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # The equal-weight average of the first two batches' statistics at the first BN layer.
    first_conv = model.conv1
    with torch.no_grad():
        means = [first_conv(x).mean(dim=(0, 2, 3)) for x, _ in batches[:2]]
    assert torch.allclose(bn.running_mean, (means[0] + means[1]) / 2, atol=1e-6)
    assert bn.momentum == 0.1 and model.training


def test_bn_recalibration_runs_before_every_evaluation(tmp_path):
    _, plain, _ = _tiny_run(tmp_path, "hydra")
    _, recal, _ = _tiny_run(tmp_path, "hydra", ["eval.bn_recalibrate=2"])
    assert recal[0]["train_loss"] == plain[0]["train_loss"]  # training itself is the same
    assert recal[-1]["train_passes"] > plain[-1]["train_passes"]  # its forwards are counted
    assert recal[-1]["val_loss"] != plain[-1]["val_loss"]


def test_select_best_val_publishes_the_best_epoch(tmp_path):
    result, rows, run_dir = _tiny_run(tmp_path, "hydra", ["eval.select=best_val", "train.epochs=3"])
    best = max(rows, key=lambda r: r["val_acc"])  # the first maximum, as the loop keeps it
    best = next(r for r in rows if r["val_acc"] == best["val_acc"])
    assert result["test_acc"] == best["test_acc"] and result["best_epoch"] == best["epoch"]
    final = torch.load(run_dir / identity.FINAL, weights_only=True)["model"]
    saved = torch.load(run_dir / identity.BEST, weights_only=True)["model"]
    assert all(torch.equal(final[k], saved[k]) for k in final)


def test_defaults_leave_ids_unhashed():
    base = method_config("hydra", "unstructured")
    same = method_config("hydra", "unstructured", ["run.diagnostics=step"])
    assert identity.run_id(base) == identity.run_id(same)
    for extra in (["prune.hysteresis=0.1"], ["prune.refresh_every=2"], ["prune.ramp_epochs=1"],
                  ["prune.score_step_clip=0.01"], ["eval.bn_recalibrate=4"], ["eval.select=best_val"]):
        assert identity.run_id(method_config("hydra", "unstructured", extra)) != identity.run_id(base), extra
    # one-shot methods and finetunes do not read the score options: one id whatever they say
    omp = method_config("omp", "unstructured")
    assert identity.run_id(omp) == identity.run_id(method_config("omp", "unstructured", ["prune.hysteresis=0.1"]))


@pytest.mark.parametrize("bad,words", [
    (["prune.hysteresis=0.1", "prune.layer_type=filter"], "hysteresis"),
    (["prune.ramp_epochs=2", "prune.layer_type=channel"], "ramp_epochs"),
    (["prune.method=hydra", "prune.ramp_epochs=2", "train.epochs=2"], "never keep exactly k"),
    (["prune.refresh_every=0"], "refresh_every"),
    (["prune.score_step_clip=-1"], "score_step_clip"),
    (["eval.select=best"], "eval.select"),
    (["eval.bn_recalibrate=-2"], "bn_recalibrate"),
    (["prune.method=bip", "bip.variant=reference", "prune.hysteresis=0.1"], "reference"),
])
def test_bad_options_are_one_line_errors(bad, words):
    from bip.errors import BipError
    with pytest.raises(BipError, match=words):
        load_config([], ["run.stage=prune", "prune.layer_type=unstructured", "prune.k=0.3", *bad])


@pytest.mark.parametrize("diagnostics", ["none", "step"])
def test_refresh_every_keeps_its_phase_across_a_resume(diagnostics):
    extra = ["prune.refresh_every=3", "optim.lr=1.0", f"run.diagnostics={diagnostics}"]
    a, model_a = _method("hydra", extra)
    batches = image_batches(6)
    for batch in batches[:4]:
        a.step([batch], 0.0)
    # deep copies: load_state_dict may keep the very tensors (momentum buffers) it is given
    saved_model, saved_method = copy.deepcopy(model_a.state_dict()), copy.deepcopy(a.state_dict())
    # The same source (as a resumed run builds it), then the checkpoint's state.
    b, model_b = _method("hydra", extra)
    model_b.load_state_dict(saved_model)
    b.load_state_dict(saved_method)
    for batch in batches[4:]:
        a.step([batch], 0.0)
        b.step([batch], 0.0)
        assert all(torch.equal(x, y) for x, y in zip(_masks(model_a), _masks(model_b)))
    if diagnostics == "step":
        assert a.monitor.epoch_fields() == b.monitor.epoch_fields()
