"""Masked layers and masks: exact kept counts, deterministic ties, straight-through gradient."""
import math

import pytest
import torch
import torch.nn as nn

from bip.pruning import masking
from bip.errors import BipError
from bip.pruning.layers import LayerFactory, MaskedConv2d, MaskedLinear
from bip.models import create_model

KS = [1.0, 0.5, 0.1, 0.0092]


def _nearest(k, n):
    return n if k >= 1 else max(1, math.floor(k * n + 0.5))


@pytest.mark.parametrize("k", KS)
def test_unstructured_keeps_exact_global_count(k):
    torch.manual_seed(0)
    model = create_model("resnet20s", 10, "unstructured")
    masking.init_scores(model, "magnitude")
    masking.refresh_masks(model, k)
    report = masking.sparsity_report(model)
    assert report["total"] == 268_336
    assert report["kept"] == _nearest(k, 268_336)
    # The budget is global: per-layer densities are free to differ (except at k = 1).
    densities = {round(v["kept_fraction"], 3) for v in report["layers"].values()}
    assert len(densities) > 1 or k == 1.0


@pytest.mark.parametrize("granularity", ["filter", "channel"])
@pytest.mark.parametrize("k", KS)
def test_structured_keeps_exact_units_per_layer(granularity, k):
    torch.manual_seed(0)
    model = create_model("resnet20s", 10, granularity)
    masking.init_scores(model, "magnitude")
    masking.refresh_masks(model, k)
    report = masking.sparsity_report(model)
    for name, layer in masking.masked_layers(model):
        units = layer.weight.shape[0 if granularity == "filter" else 1]
        entry = report["layers"][name]
        assert entry["total"] == units
        assert entry["kept"] == _nearest(k, units)  # at least 1, e.g. 1 of 3 RGB channels at k=0.1
        dim = 0 if granularity == "filter" else 1
        per_unit = layer.mask.transpose(0, dim).flatten(1)
        # whole filters / channels: every unit is all-ones or all-zeros
        assert torch.all((per_unit.sum(1) == 0) | (per_unit.sum(1) == per_unit.shape[1]))
    # linear layers stay dense in structured modes
    assert all(not isinstance(m, MaskedLinear) for m in model.modules())


def test_keep_count_rules():
    assert masking.keep_count(0.8, 10) == 8
    assert masking.keep_count(0.8, 10, "reference") == 9  # (1 - 0.8) * 10 = 1.9999999999999996
    assert masking.keep_count(0.1, 3) == 1 and masking.keep_count(0.1, 3, "reference") == 1
    assert masking.keep_count(0.0092, 268_336, "reference") == 2469
    assert masking.keep_count(1.0, 7) == 7 and masking.keep_count(1e-9, 7) == 1


def _linear_model(*sizes):
    return nn.Sequential(*[MaskedLinear(i, o, bias=False) for i, o in zip(sizes, sizes[1:])])


def test_ties_break_deterministically_and_exactly():
    model = _linear_model(3, 2)
    model[0].scores.data = torch.tensor([[1.0, 3.0, 2.0], [2.0, -2.0, 0.0]])
    masking.refresh_masks(model, 0.5)
    # 3.0 plus the two EARLIEST of the tied |2.0|s
    assert model[0].mask.flatten().tolist() == [False, True, True, True, False, False]
    model[0].scores.data.zero_()
    masking.refresh_masks(model, 0.5)
    assert model[0].mask.flatten().tolist() == [True] * 3 + [False] * 3


@pytest.mark.parametrize("shape", [(50, 10), (200, 200)])  # sort path / radix path
def test_nan_scores_rank_last_and_the_count_stays_exact(shape):
    model = _linear_model(*shape)
    s = model[0].scores.data
    s.uniform_(-1, 1)
    s.view(-1)[[3, 17, 41]] = float("nan")
    s.view(-1)[7] = float("-inf")
    n = s.numel()
    for k in (0.5, 1 - 2 / n):
        masking.refresh_masks(model, k)
        kept = model[0].mask.view(-1)
        assert int(kept.sum()) == masking.keep_count(k, n)
        assert not kept[[17, 41]].any()  # non-finite last; among them the earliest first
    s.view(-1)[: n // 2 + 10] = float("nan")  # a majority of NaNs
    masking.refresh_masks(model, 0.8)
    assert int(model[0].mask.sum()) == masking.keep_count(0.8, n)


def test_plan_is_cached_not_rediscovered_each_step():
    model = _linear_model(8, 6, 4)
    masking.refresh_masks(model, 0.5)

    def boom(*a, **k):
        raise AssertionError("named_modules walked on the hot path")
    model.named_modules = boom
    masking.refresh_masks(model, 0.5)
    with masking.grad_target(model, "scores"):
        model(torch.randn(2, 8)).sum().backward()
    del model.named_modules
    masking.forget(model)
    assert masking.plan(model) is not masking.plan(nn.Sequential())


@pytest.mark.parametrize("k", [0.3, 0.05])
def test_layer_scope_keeps_round_k_n_in_every_layer(k):
    torch.manual_seed(0)
    model = create_model("resnet20s", 10, "unstructured")
    masking.init_scores(model, "magnitude")
    masking.configure(model, _prune(k=k, scope="layer"))
    masking.refresh_masks(model, k)
    for name, m in masking.masked_layers(model):
        assert int(m.mask.sum()) == _nearest(k, m.mask.numel()), name


def _prune(**kw):
    from bip.config import load_config
    lt = kw.pop("layer_type", "unstructured")
    return load_config([], ["run.stage=prune", f"prune.layer_type={lt}",
                            *[f"prune.{k}={v}" for k, v in kw.items()]]).prune


@pytest.mark.parametrize("floor", [0.001, 3])
def test_floor_keeps_every_layer_and_the_exact_total(floor):
    torch.manual_seed(0)
    model = create_model("resnet20s", 10, "unstructured")
    masking.init_scores(model, "magnitude")
    with torch.no_grad():  # make the global top-k starve conv1 and fc completely
        model.conv1.scores.mul_(1e-6)
        model.fc.scores.mul_(1e-6)
    k = 0.002
    masking.refresh_masks(model, k)
    assert int(model.conv1.mask.sum()) == 0 and int(model.fc.mask.sum()) == 0
    masking.configure(model, _prune(k=k, min_layer_keep=floor))
    masking.refresh_masks(model, k)
    report = masking.sparsity_report(model)
    assert report["kept"] == _nearest(k, report["total"])
    for name, m in masking.masked_layers(model):
        assert int(m.mask.sum()) >= masking.floor_count(floor, m.mask.numel()) > 0, name
    # the floor's units are each layer's own top units
    s, kept = model.fc.scores.abs().flatten(), model.fc.mask.flatten()
    assert s[kept].min() >= s[~kept].max()


def test_floor_above_the_budget_is_a_clear_error():
    model = create_model("resnet20s", 10, "unstructured")
    with pytest.raises(BipError, match="min_layer_keep"):
        masking.configure(model, _prune(k=0.001, min_layer_keep=0.05))


def test_skip_leaves_layers_dense_and_k_counts_the_pruned_layers():
    torch.manual_seed(0)
    model = create_model("resnet20s", 10, "unstructured")
    masking.init_scores(model, "magnitude")
    masking.configure(model, _prune(k=0.1, skip="first,classifier"))
    masking.refresh_masks(model, 0.1)
    report = masking.sparsity_report(model)
    assert set(report["dense_layers"]) == {"conv1", "fc"}
    assert model.conv1.mask.all() and model.fc.mask.all()
    pruned = [m for n, m in masking.masked_layers(model) if n not in ("conv1", "fc")]
    assert report["total"] == sum(m.mask.numel() for m in pruned)
    assert report["kept"] == _nearest(0.1, report["total"])
    assert not any(s is model.conv1.scores for s in masking.score_parameters(model))
    masking.configure(model, _prune(k=0.1, skip="layer1.0.conv1"))
    assert set(masking.sparsity_report(model)["dense_layers"]) == {"layer1.0.conv1"}
    with pytest.raises(BipError, match="no conv or linear layer named 'conv9'"):
        masking.configure(model, _prune(k=0.1, skip="conv9"))


def _assert_nm(layer, n, m):
    w = layer.mask
    groups = w.permute(0, *range(2, w.dim()), 1).reshape(-1, m) if w.dim() > 2 else w.reshape(-1, m)
    assert torch.all(groups.sum(1) == n)


def test_nm_pattern_and_dense_layers():
    torch.manual_seed(0)
    model = create_model("resnet20s", 10, "nm")
    masking.init_scores(model, "magnitude")
    masking.configure(model, _prune(layer_type="nm"))
    masking.refresh_masks(model, 0.5)
    report = masking.sparsity_report(model)
    assert report["dense_layers"] == {"conv1": "input size 3 is not a multiple of m=4"}
    assert report["kept_fraction"] == 0.5
    for name, layer in masking.masked_layers(model):
        if name != "conv1":
            _assert_nm(layer, 2, 4)
    # groups run along the input channels at each kernel position: weights [out, kh, kw, in]
    layer = model.layer1[0].conv1
    s = layer.scores.detach().abs().permute(0, 2, 3, 1).reshape(-1, 4)
    kept = layer.mask.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.all(s.gather(1, s.topk(2, dim=1).indices).min(1).values >= (s * ~kept).max(1).values)


def test_structured_selection_works_on_2d_weights():
    layer = MaskedLinear(6, 5, bias=False)
    layer.granularity = "filter"  # the models helper enables structured Linear masks
    layer.scores.data = torch.arange(30.0).view(5, 6) * torch.tensor([1.0, -1, 1, -1, 0.5])[:, None]
    model = nn.Sequential(layer)
    masking.refresh_masks(model, 0.4)
    assert layer.mask.all(1).tolist() == [False, False, True, True, False]  # largest row norms
    layer.granularity = "channel"
    masking.forget(model)
    masking.refresh_masks(model, 0.5)
    assert layer.mask.all(0).tolist() == [False, False, False, True, True, True]


def test_tiny_layers():
    layer = MaskedConv2d(1, 2, 1, granularity="filter")
    model = nn.Sequential(layer)
    masking.refresh_masks(model, 0.0092)
    assert int(layer.mask.sum()) == 1  # never an empty layer
    lin = nn.Sequential(MaskedLinear(2, 1, bias=False))
    masking.refresh_masks(lin, 0.5)
    assert int(lin[0].mask.sum()) == 1


@pytest.mark.parametrize("ig", [0.0, 0.7])
def test_straight_through_gradient_matches_autograd_reference(ig):
    torch.manual_seed(0)
    layer = MaskedConv2d(3, 4, 3, padding=1, bias=False, granularity="unstructured").double()
    layer.scores.data.normal_()
    masking.refresh_masks(nn.Sequential(layer), 0.4)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with masking.grad_target(nn.Sequential(layer), "all", ig):
        layer(x).square().sum().backward()
    # Reference: Z = W * M as a leaf, dL/dZ by autograd, then the documented formulas.
    z = (layer.weight.detach() * layer.mask).requires_grad_(True)
    nn.functional.conv2d(x, z, padding=1).square().sum().backward()
    g, w, m, s = z.grad, layer.weight.detach(), layer.mask, layer.scores.detach()
    torch.testing.assert_close(layer.weight.grad, m * g, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.scores.grad, torch.sign(s) * (w - ig * m * g) * g, rtol=0, atol=1e-12)
    assert (layer.scores.grad[m == 0] != 0).any()  # pruned positions get gradient too


def test_grad_target_selects_tensors():
    layer = MaskedLinear(4, 3)
    model = nn.Sequential(layer)
    x = torch.randn(5, 4)
    with masking.grad_target(model, "weights"):
        model(x).sum().backward()
    assert layer.weight.grad is not None and layer.scores.grad is None
    layer.weight.grad = None
    with masking.grad_target(model, "scores"):
        model(x).sum().backward()
    assert layer.weight.grad is None and layer.scores.grad is not None
    assert layer.grad_target == "all"  # restored


def test_score_inits_never_share_memory():
    torch.manual_seed(0)
    model = create_model("resnet20s", 10, "unstructured")
    for how in ("magnitude", "hydra", "kaiming"):
        masking.init_scores(model, how)
        for _, m in masking.masked_layers(model):
            assert m.scores.data_ptr() != m.weight.data_ptr()
    masking.init_scores(model, "magnitude")
    conv = masking.masked_layers(model)[0][1]
    assert torch.equal(conv.scores, conv.weight)
    masking.init_scores(model, "hydra")
    fan_in = conv.weight[0].numel()
    assert conv.scores.abs().max().item() == pytest.approx(math.sqrt(6 / fan_in))


def test_mask_is_a_pure_function_of_scores():
    torch.manual_seed(0)
    a = create_model("resnet20s", 10, "unstructured")
    b = create_model("resnet20s", 10, "unstructured")
    b.load_state_dict(a.state_dict())
    masking.refresh_masks(a, 0.1)
    masking.refresh_masks(b, 0.1)
    for (_, la), (_, lb) in zip(masking.masked_layers(a), masking.masked_layers(b)):
        assert torch.equal(la.mask, lb.mask)


def test_dense_layer_factory_is_plain():
    f = LayerFactory("dense")
    assert type(f.conv(3, 4, 3)) is nn.Conv2d and type(f.linear(3, 4)) is nn.Linear


@pytest.mark.parametrize("layer_type,extra", [("nm", {}), ("unstructured", {"skip": "first,classifier"})])
def test_report_and_effective_counts_agree(layer_type, extra):
    from bip.models.accounting import count_params_and_macs
    torch.manual_seed(0)
    model = create_model("resnet20s", 10, layer_type)
    masking.init_scores(model, "magnitude")
    budget = {} if layer_type == "nm" else {"k": 0.2}
    masking.configure(model, _prune(layer_type=layer_type, **budget, **extra))
    masking.refresh_masks(model, 0.5 if layer_type == "nm" else 0.2)
    report = masking.sparsity_report(model)
    counts = count_params_and_macs(model, (3, 32, 32))
    pruned_weights = report["weights_total"] - report["weights_kept"]
    assert counts["params_dense"] - counts["params_effective"] == pruned_weights
    dense = sum(m.weight.numel() for n, m in masking.masked_layers(model) if n in report["dense_layers"])
    assert report["weights_kept"] == dense + report["kept"]  # units are weights here
