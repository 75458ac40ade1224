"""Masked layers and masks: exact kept counts, deterministic ties, straight-through gradient."""
import math

import pytest
import torch
import torch.nn as nn

from bip import masking
from bip.layers import LayerFactory, MaskedConv2d, MaskedLinear
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


def test_ties_break_deterministically_and_exactly():
    values = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.0])
    keep = masking.top_mask(values, 3)
    # 3.0 plus the two EARLIEST of the tied 2.0s
    assert keep.tolist() == [False, True, True, True, False, False]
    assert masking.top_mask(torch.zeros(10), 4).tolist() == [True] * 4 + [False] * 6


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
