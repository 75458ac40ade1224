"""CUDA paths (skipped without a GPU): the same math on the device, bf16 training end to end."""
import copy

import pytest
import torch
import torch.nn as nn

from bip.pruning import masking
from bip.config import load_config
from bip.pruning.layers import MaskedConv2d, MaskedLinear
from bip.methods.bilevel import BipPaper

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _select(values, k):
    from bip.pruning import topk
    keys = topk.rank_keys_(values.clone())
    out = torch.empty(values.numel(), dtype=torch.bool, device=values.device)
    return topk.TopK(values.numel(), values.dtype, values.device).select(keys, k, out)


def test_mask_selection_on_cuda_matches_cpu_without_syncs():
    torch.manual_seed(0)
    values = torch.rand(3_000_000 // 4096 * 4096) ** 2
    values[:1000] = values[5000]  # ties at many places
    values[7:20] = float("nan")
    for k in (1, 12345, 2_000_000):
        torch.cuda.set_sync_debug_mode("error")
        try:
            on_gpu = _select(values.cuda(), k)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(on_gpu.cpu(), _select(values, k))


@pytest.mark.parametrize("layer_type", ["unstructured", "filter", "channel", "nm"])
def test_mask_refresh_on_cuda_matches_cpu_without_syncs(layer_type):
    from bip.models import create_model
    torch.manual_seed(0)
    cpu = create_model("resnet20s", 10, layer_type)
    masking.init_scores(cpu, "magnitude")
    gpu = copy.deepcopy(cpu).cuda()
    masking.refresh_masks(cpu, 0.1)
    masking.refresh_masks(gpu, 0.1)  # first call allocates the workspace
    torch.cuda.set_sync_debug_mode("error")
    try:
        masking.refresh_masks(gpu, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (_, a), (_, b) in zip(masking.masked_layers(cpu), masking.masked_layers(gpu)):
        assert torch.equal(a.mask, b.mask.cpu())


def test_bip_step_on_cuda_matches_cpu_in_float64():
    torch.manual_seed(0)
    cpu = nn.Sequential(MaskedConv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), MaskedLinear(8, 5)).double()
    gpu = copy.deepcopy(cpu).cuda()
    cfg = load_config([], ["run.stage=prune", "prune.layer_type=unstructured", "prune.k=0.3",
                           "prune.method=bip", "prune.score_init=magnitude"])
    batches = [(torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (8,))) for _ in range(2)]
    a, b = BipPaper(cfg, cpu), BipPaper(cfg, gpu)
    a.step(batches, 0.0)
    b.step([(x.cuda(), y.cuda()) for x, y in batches], 0.0)
    for (name, p), q in zip(cpu.state_dict().items(), gpu.state_dict().values()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-9, atol=1e-12, msg=name)


def test_bf16_pretrain_and_bip_on_cuda(tmp_path):
    from bip.config import identity
    from bip.train import train
    base = ["data.dataset=synthetic", "data.synthetic_size=512", "data.batch_size=64", "train.epochs=2",
            "train.mixed_precision=bf16", f"run.result_dir={tmp_path}"]
    pre = load_config([], base)
    result = train(pre)
    assert result["device"] != "cpu" and result["test_acc"] > 30
    prune = load_config([], base + ["run.stage=prune", "prune.method=bip", "prune.layer_type=unstructured",
                                    "prune.k=0.1", f"run.parent={identity.run_id(pre)}"])
    assert abs(train(prune)["sparsity"]["kept_fraction"] - 0.1) < 1e-5


def test_channels_last_and_compile_on_cuda_without_recompiles_or_syncs():
    """bf16 BiP steps of a channels_last, inductor-compiled model: both passes compile in the
    first step only, later steps (new masks each time) neither recompile nor sync, and the
    weights follow the plain eager model's (bf16 / TF32 round-off)."""
    from bip.testing.compile import CompileCounter
    from bip.train.compile import compile_model, to_channels_last
    torch.manual_seed(0)
    plain = nn.Sequential(MaskedConv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          MaskedConv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), MaskedLinear(16, 5)).cuda()
    fast = copy.deepcopy(plain)
    counter = CompileCounter("inductor")
    to_channels_last(fast)
    compile_model(fast, counter)
    cfg = load_config([], ["run.stage=prune", "prune.layer_type=unstructured", "prune.k=0.3",
                           "prune.method=bip", "prune.score_init=magnitude", "train.mixed_precision=bf16"])
    a, b = BipPaper(cfg, plain), BipPaper(cfg, fast)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, 12, 12, generator=g).cuda(), torch.randint(0, 5, (16,), generator=g).cuda())
            for _ in range(8)]
    a.step(data[:2], 0.0)
    b.step(data[:2], 0.0)
    warm = counter.graphs
    assert warm == 2
    for i in range(1, 4):
        a.step(data[2 * i:2 * i + 2], i / 10)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            b.step(data[2 * i:2 * i + 2], i / 10)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert counter.graphs == warm
    assert fast[0].weight.is_contiguous(memory_format=torch.channels_last)
    for (name, x), y in zip(plain.state_dict().items(), fast.state_dict().values()):
        if x.is_floating_point():
            torch.testing.assert_close(y, x, rtol=2e-2, atol=2e-2, msg=name)
