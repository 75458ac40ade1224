"""torchvision / timm models by name (tv:, timm:): swap, coverage, training steps, sources, grids.

Random weights, 32x32 inputs (the ViTs are built for 32x32), nothing downloaded."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
import yaml

from bip.config import identity
from bip.pruning import masking
from bip.config import load_config
from bip.errors import BipError
from bip.pruning.layers import MaskedConv2d, MaskedLayer, MaskedLinear
from bip.methods.registry import create_method
from bip.models import create_model
from bip.models.external import ResizeInput, input_defaults
from bip.models.swap import MaskedMultiheadAttention, swap_layers
from helpers import image_batches

HERE = Path(__file__).resolve().parent
TIMM_ARCH = "timm:vit_tiny_patch16_224"
ARCHS = ["tv:mobilenet_v3_small", "tv:efficientnet_b0", "tv:convnext_tiny", "tv:regnet_y_400mf",
         "tv:vit_b_16", TIMM_ARCH]
K = 0.5


def _needs(arch):
    if arch.startswith("timm:"):
        pytest.importorskip("timm")


def _batches(n=2, seed=0):
    # 4 images: with 2, a train-mode BatchNorm over 1x1 maps outputs +-1 whatever its input,
    # and no gradient reaches the layers before it.
    return image_batches(n, size=32, seed=seed)


def _model(arch, layer_type, **options):
    """Random weights, as a pretrained model has them everywhere: torchvision zero-initialises
    ViT's head, which would keep every gradient of a random-init model at zero."""
    torch.manual_seed(0)
    model = create_model(arch, 10, layer_type, input_size=32, **options)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.normal_(0, 0.02)
    return model


def _dense_layers(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, MaskedLayer)]


def _prune_cfg(layer_type, method):
    return load_config([], ["run.stage=prune", f"prune.layer_type={layer_type}", f"prune.k={K}",
                            f"prune.method={method}", "train.epochs=1",
                            "bip.alpha=0.1", "bip.beta=0.5", "optim.lr=0.5"])


def _check_kept(model, layer_type):
    """The report is measured from the masks; k of the units are kept (per layer when structured)."""
    report = masking.sparsity_report(model)
    if layer_type == "unstructured":
        assert report["kept"] == masking.keep_count(K, report["total"])
    else:
        for name, layer in report["layers"].items():
            assert layer["kept"] == masking.keep_count(K, layer["total"]), name
    assert abs(report["kept_fraction"] - K) < 0.02, report["kept_fraction"]
    return report


def _fingerprint(t):
    """Changes when any entry of ``t`` changes (up to float64 coincidence)."""
    t = t.detach().double().flatten()
    return torch.stack([t.sum(), (t * torch.arange(1, len(t) + 1, dtype=torch.float64)).sum()])


# Each model: hydra (unstructured) and bip (filter, channel). One method per layer type keeps
# ViT-B's 86M-score global top-k (seconds on 2 cores) to two selections.
PLAN = [("unstructured", "hydra"), ("filter", "bip"), ("channel", "bip")]


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_steps_and_sparsity_report(arch):
    _needs(arch)
    for layer_type, method_name in PLAN:
        model = _model(arch, layer_type)
        layers = masking.masked_layers(model)
        dense = _dense_layers(model)
        # Everything is masked but, under channel, grouped convs (documented rule).
        assert all(isinstance(m, nn.Conv2d) and m.groups > 1 and layer_type == "channel"
                   for _, m in dense), dense
        if arch == "tv:vit_b_16":  # 12 blocks x (packed in_proj, out_proj, 2 MLP) + patch conv + head
            assert len(layers) == 12 * 4 + 2
            assert sum(isinstance(m, MaskedMultiheadAttention) for m in model.modules()) == 12
        method = create_method(_prune_cfg(layer_type, method_name), model)
        weights = {n: _fingerprint(m.weight) for n, m in layers}  # ViT-B: no 2 x 86M copies
        scores = {n: _fingerprint(m.scores) for n, m in layers}
        stats = method.step(_batches(), 0.0)
        assert torch.isfinite(stats["loss"])
        # Every masked layer is in the autograd graph of the loss (a layer the forward skips keeps
        # grad None). Some may get an exact 0 in a random net (a dead ReLU), not all of them.
        assert all(m.scores.grad is not None for _, m in layers), method_name
        assert sum(bool(m.scores.grad.any()) for _, m in layers) > 0.9 * len(layers)
        assert sum(not torch.equal(_fingerprint(m.scores), scores[n]) for n, m in layers) > 0.9 * len(layers)
        moved = [n for n, m in layers if not torch.equal(_fingerprint(m.weight), weights[n])]
        if method_name == "hydra":
            assert moved == []  # weights frozen
        else:  # bip's lower level trains the weights
            assert len(moved) > 0.9 * len(layers)
        _check_kept(model, layer_type)
        del model, method, layers, weights, scores  # ViT-B: one model in memory at a time


def test_linear_rows_and_columns_are_the_structured_units():
    torch.manual_seed(0)
    model = create_model(TIMM_ARCH if _has_timm() else "tv:vit_b_16", 10, "filter", input_size=32)
    masking.refresh_masks(model, K)
    for _, m in masking.masked_layers(model):
        if isinstance(m, nn.Linear):  # whole output rows kept or pruned
            rows = m.mask.all(dim=1) | ~m.mask.any(dim=1)
            assert rows.all() and int(m.mask.any(dim=1).sum()) == masking.keep_count(K, m.out_features)
    lin = MaskedLinear(6, 4, granularity="channel")
    masking.refresh_masks(nn.Sequential(lin), K)
    assert lin.mask.all(dim=0).sum() == 3 and (lin.mask.all(dim=0) | ~lin.mask.any(dim=0)).all()


def _has_timm():
    try:
        import timm  # noqa: F401
        return True
    except ImportError:
        return False


# -- what is and is not masked ------------------------------------------------------------------

def test_skip_options_leave_exactly_those_layers_dense():
    torch.manual_seed(0)
    skip = ("first_conv", "classifier", "depthwise")
    model = create_model("tv:mobilenet_v3_small", 10, "unstructured", input_size=32, skip=skip)
    dense = dict(_dense_layers(model))
    assert "features.0.0" in dense and "classifier.3" in dense  # stem conv, logits layer
    depthwise = {n for n, m in dense.items() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1}
    assert set(dense) == {"features.0.0", "classifier.3"} | depthwise and len(depthwise) == 11
    model = create_model("tv:convnext_tiny", 10, "filter", input_size=32, skip=("patch_embed",))
    # the 4x4/4 stem and the three 2x2/2 downsampling convs
    assert sorted(dict(_dense_layers(model))) == ["features.0.0", "features.2.1", "features.4.1",
                                                  "features.6.1"]
    with pytest.raises(BipError, match="apply to tv:/timm: models"):
        create_model("resnet20s", 10, "unstructured", skip=("classifier",))


def test_timm_names_its_first_conv_and_classifier():
    pytest.importorskip("timm")
    model = create_model(TIMM_ARCH, 10, "unstructured", input_size=32, skip=("first_conv", "classifier"))
    assert sorted(dict(_dense_layers(model))) == ["head", "patch_embed.proj"]


def test_grouped_convs_under_channel_stay_dense_and_are_masked_per_filter():
    torch.manual_seed(0)
    channel = create_model("tv:regnet_y_400mf", 10, "channel", input_size=32)
    grouped = [n for n, m in channel.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert grouped and set(grouped) == {n for n, _ in _dense_layers(channel)}
    filt = create_model("tv:regnet_y_400mf", 10, "filter", input_size=32)
    masking.refresh_masks(filt, K)
    conv = filt.get_submodule(grouped[0])
    assert isinstance(conv, MaskedConv2d) and conv.groups > 1
    alive = conv.mask.flatten(1).any(1)
    assert int(alive.sum()) == masking.keep_count(K, conv.out_channels)
    assert (conv.mask.flatten(1).all(1) == alive).all()  # whole filters


class _MatmulHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.proj = nn.Parameter(torch.randn(4, 10))

    def forward(self, x):
        return self.conv(x).mean((2, 3)) @ self.proj


class _ReadsChildWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x):  # bypasses fc.forward: swapping fc alone would not mask this
        return nn.functional.linear(x.mean((2, 3)), self.fc.weight, self.fc.bias)


class _Conv1dInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 10, 1)
        self.pos = nn.Parameter(torch.zeros(1, 3, 8, 8))  # elementwise only: fine

    def forward(self, x):
        return self.conv((x + self.pos).flatten(2)).mean(2)


@pytest.mark.parametrize("model, uncovered", [
    (_MatmulHead, "proj (used directly by matmul)"),
    (_ReadsChildWeight, "fc.weight (used directly by linear)"),
    (_Conv1dInside, "conv.weight (torch.nn.modules.conv.Conv1d is not swappable)"),
])
def test_uncovered_parameters_are_a_clear_error(model, uncovered):
    with pytest.raises(BipError, match="cannot cover 1 parameter") as err:
        swap_layers(model(), "unstructured", input_size=8)
    assert uncovered in str(err.value) and "\n" not in str(err.value)


def test_torchvision_swin_is_refused_not_half_masked():
    """Its window attention calls F.linear on its qkv / proj children's raw weights."""
    with pytest.raises(BipError, match=r"tv:swin_t: .* cannot cover 24 parameter\(s\).*"
                                       r"features.1.0.attn.qkv.weight \(used directly by linear\)"):
        create_model("tv:swin_t", 10, "unstructured", input_size=32)


def test_masked_attention_matches_torch_and_honours_the_mask():
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
        masked = MaskedMultiheadAttention(copy.deepcopy(mha), "unstructured").eval()
        q, kv = torch.randn(3, 5, 8), torch.randn(3, 7, 8)  # (batch, sequence, embedding)
        if not batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        pad = torch.zeros(3, 7, dtype=torch.bool)
        pad[:, -1] = True
        for args, kw in [((q, q, q), {}), ((q, kv, kv), {"key_padding_mask": pad})]:
            want, got = mha(*args, **kw), masked(*args, **kw)
            assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
        masked.in_proj.mask[:8] = False  # prune the query projection
        with torch.no_grad():
            mha.in_proj_weight[:8] = 0
        assert torch.equal(mha(q, q, q)[0], masked(q, q, q)[0])
    # Inside torch's TransformerEncoderLayer, in eval mode without grad (where torch would take
    # its fused path, reading in_proj_weight itself), the masked projections still run.
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0).eval()
    enc = copy.deepcopy(ref)
    enc.self_attn = MaskedMultiheadAttention(enc.self_attn, "unstructured")
    enc.self_attn.in_proj.mask[:8] = False
    with torch.no_grad():
        ref.self_attn.in_proj_weight[:8] = 0
        x = torch.randn(2, 4, 8)
        torch.testing.assert_close(enc(x), ref(x), rtol=1e-5, atol=1e-5)


def test_torchvision_state_dict_reproduces_the_dense_outputs(tmp_path):
    """--source-net with a plain torchvision state dict (MHA's packed keys included): with all-ones
    masks, before pruning starts, the masked model computes exactly what the dense one does."""
    from bip.train.sources import load_source
    for arch in ("tv:vit_b_16", "tv:efficientnet_b0"):
        torch.manual_seed(1)
        name = arch.split(":")[1]
        dense = torchvision.models.get_model(name, weights=None, num_classes=10,
                                             **({"image_size": 32} if "vit" in name else {})).eval()
        path = tmp_path / f"{name}.pth"
        torch.save(dense.state_dict(), path)
        torch.manual_seed(2)  # different random weights: only the file can make them equal
        cfg = load_config([], ["run.stage=prune", "prune.layer_type=unstructured", f"model.arch={arch}",
                               f"run.source_net={path}", "model.input_size=32"])
        model = create_model(arch, 10, "unstructured", input_size=32).eval()
        load_source(cfg, model, path)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(model(x), dense(x)), arch


def test_timm_safetensors_source(tmp_path):
    pytest.importorskip("timm")
    from safetensors.torch import save_file

    import timm
    from bip.train.sources import load_source
    torch.manual_seed(1)
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(path))
    cfg = load_config([], ["run.stage=prune", "prune.layer_type=filter", f"model.arch={TIMM_ARCH}",
                           f"run.source_net={path}"])
    model = create_model(TIMM_ARCH, 10, "filter", input_size=32).eval()
    load_source(cfg, model, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), dense(x))
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(BipError, match="not a safetensors file"):
        load_source(cfg, model, path)


# -- inputs ----------------------------------------------------------------------------------------

def test_input_size_and_normalisation_come_from_the_pretrained_config():
    from bip.data.base import DatasetSpec
    from bip.train.sources import model_input
    tv = input_defaults("tv:regnet_y_400mf")
    assert (tv.size, tv.mean, tv.fixed) == (224, (0.485, 0.456, 0.406), False)
    assert input_defaults("tv:vit_b_16").fixed and input_defaults("tv:efficientnet_b3").size == 300
    imagenet = DatasetSpec(1000, None, None, (0.0,) * 3, (1.0,) * 3, style="imagenet", image_size=224)
    cfg = load_config([], ["model.arch=tv:efficientnet_b3", "data.dataset=ImageNet"])
    assert model_input(cfg, imagenet).image_size == 300
    at_256 = DatasetSpec(1000, None, None, (0.0,) * 3, (1.0,) * 3, style="imagenet", image_size=256)
    assert model_input(cfg.replace(**{"data.image_size": 256}), at_256).image_size == 256  # as set
    small = DatasetSpec(10, None, None, (0.0,) * 3, (1.0,) * 3, image_size=32)
    assert model_input(cfg, small) == DatasetSpec(10, None, None, tv.mean, tv.std, image_size=32)
    if _has_timm():
        assert input_defaults(TIMM_ARCH).mean == (0.5, 0.5, 0.5)


def test_small_images_are_resized_on_the_device_to_the_model_size():
    torch.manual_seed(0)
    model = create_model("tv:mobilenet_v3_small", 10, "unstructured", input_size=64).eval()
    seen = []
    model.features[0].register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    model(torch.randn(1, 3, 32, 32))
    model(torch.randn(1, 3, 100, 100))
    assert seen == [(1, 3, 64, 64)] * 2
    assert ResizeInput(32)(None, (torch.zeros(1, 3, 32, 32),)) is None  # the right size: untouched


# -- runs, ids and grids ---------------------------------------------------------------------------

def test_train_prunes_a_torchvision_model_from_its_state_dict(tmp_path):
    from bip.train import train
    torch.manual_seed(3)
    dense = torchvision.models.mobilenet_v3_small(num_classes=10)
    source = tmp_path / "mobilenet_v3_small.pth"
    torch.save(dense.state_dict(), source)
    cfg = load_config([], ["data.dataset=synthetic", "data.synthetic_size=64", "data.batch_size=8",
                           "model.arch=tv:mobilenet_v3_small", "model.input_size=32",
                           "model.skip_classifier=true", "run.stage=prune", "prune.layer_type=channel",
                           "prune.method=hydra", "prune.k=0.5", "train.epochs=1",
                           "train.steps_per_epoch=1", f"run.source_net={source}",
                           f"run.result_dir={tmp_path / 'runs'}", "data.num_workers=0"])
    run_dir = identity.run_dir(cfg)
    assert run_dir.parent.name.startswith("synthetic-tv+mobilenet_v3_small-prune-hydra-")
    result = train(cfg, run_dir)
    assert abs(result["sparsity"]["kept_fraction"] - K) < 0.01
    meta = torch.load(run_dir / "checkpoint.pt", weights_only=True)["meta"]
    rebuilt = create_model(meta["arch"], meta["num_classes"], meta["layer_type"], **meta["model_options"])
    rebuilt.load_state_dict(torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"])
    assert "classifier.3" in dict(_dense_layers(rebuilt))


def test_grid_pretrain_source_submits_no_pretrain(tmp_path):
    from launch import sweep
    source = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), source)
    doc = {"name": "g", "profile": "local", "set": {"dataset": "synthetic", "arch": "tv:resnet18"},
           "stages": {"pretrain": {"source": str(source)}, "prune": {"set": {"layer_type": "unstructured"}},
                      "finetune": {"methods": ["hydra"]}},
           "axes": {"method": ["hydra", "bip"], "k": [0.5, 0.2]}}
    path = tmp_path / "g.yml"
    path.write_text(yaml.safe_dump(doc))
    plan = sweep.load_grid(path, tmp_path / "runs")
    assert "pretrain" not in plan.runs and len(plan.runs["prune"]) == 4 and len(plan.runs["finetune"]) == 2
    assert {r.cfg.run.source_net for r in plan.runs["prune"]} == {str(source.resolve())}
    assert all(r.cfg.run.parent for r in plan.runs["finetune"])
    doc["stages"]["pretrain"]["source"] = str(tmp_path / "missing.pth")
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(BipError, match="file not found"):
        sweep.load_grid(path, tmp_path / "runs")
    doc["stages"]["pretrain"] = {"source": str(source), "set": {"epochs": 3}}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(BipError, match="given alone"):
        sweep.load_grid(path, tmp_path / "runs")


def test_unknown_external_names_are_one_line_errors():
    with pytest.raises(BipError, match="unknown torchvision classification model 'resnet5'"):
        create_model("tv:resnet5", 10)
    with pytest.raises(BipError, match="unknown arch 'hf:resnet50'.*or tv:<torchvision model>"):
        create_model("hf:resnet50", 10)


# -- two processes ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_stay_identical_on_every_model():
    archs = [a for a in ARCHS if _has_timm() or not a.startswith("timm:")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29547", str(HERE.parent / "distributed" / "workers" / "external_ddp_worker.py"), *archs],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(report) == archs
    for arch, methods in report.items():
        for name, entry in methods.items():
            assert entry["world"] == 2 and entry["identical"], (arch, name)
            assert abs(entry["kept_fraction"] - K) < 0.02, (arch, name)


def test_shipped_imagenet_grid_expands_from_the_weights_file(tmp_path):
    """configs/grids/imagenet_tv_resnet50.yml with its weights path pointed at a stand-in file."""
    from launch import sweep
    weights = tmp_path / "resnet50-0676ba61.pth"
    weights.write_bytes(b"stand-in")  # hashed by content, never loaded here
    doc = yaml.safe_load((HERE.parents[1] / "configs/grids/imagenet_tv_resnet50.yml").read_text())
    doc["stages"]["pretrain"]["source"] = str(weights)
    path = tmp_path / "grid.yml"
    path.write_text(yaml.safe_dump(doc))
    plan = sweep.load_grid(path, tmp_path / "runs")
    assert list(plan.runs) == ["prune"] and len(plan.runs["prune"]) == 3
    cfg = plan.runs["prune"][0].cfg
    assert (cfg.model.arch, cfg.prune.method, cfg.data.loader, cfg.run.source_net) == \
        ("tv:resnet50", "bip", "ffcv", str(weights))
    assert plan.runs["prune"][0].key.startswith("ImageNet-tv+resnet50-prune-bip-")


class _TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 3)
        self.head = nn.Linear(3, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(x.mean((2, 3)))


def test_tied_weights_are_refused_and_shared_modules_swapped_once():
    with pytest.raises(BipError, match="tied weights .embed.weight is head.weight"):
        swap_layers(_TiedHead(), "unstructured", input_size=4)
    shared = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Flatten(), nn.Linear(48, 10))
    summary = swap_layers(model, "unstructured", input_size=4)
    assert model[0] is model[2] and isinstance(model[0], MaskedConv2d) and summary.masked == ["0", "4"]


def test_same_seed_same_masked_model():
    """The build-time meta forwards draw no random numbers: a seed fixes weights and scores."""
    states = []
    for _ in range(2):
        torch.manual_seed(5)
        states.append(create_model("tv:mobilenet_v3_small", 10, "unstructured", input_size=32).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("arch", ["tv:mobilenet_v3_small", "tv:regnet_y_400mf"])
@pytest.mark.parametrize("layer_type", ["filter", "channel"])
def test_thinned_external_model_equals_the_masked_one(arch, layer_type, tmp_path):
    """export --thin on a swapped torchvision model (depthwise convs, squeeze-excitation, group
    convs): physically smaller, same function, rebuilt from the file's meta alone."""
    from bip.models.accounting import count_params_and_macs
    from bip.export.run import export_thin
    from bip.export import load_thinned
    model = _model(arch, layer_type)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random BN statistics: a removed filter's constant must be folded
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    masking.init_scores(model, "kaiming")
    masking.refresh_masks(model, K)
    model.eval()
    meta = {"arch": arch, "num_classes": 10, "model_options": {"input_size": 32}}
    thinned, content, _ = export_thin(model, (3, 32, 32), meta)
    torch.save(content, tmp_path / "thin.pt")
    rebuilt = load_thinned(tmp_path / "thin.pt")
    x = torch.randn(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert (rebuilt(x) - model(x)).abs().max() <= 1e-4
    masked, thin = count_params_and_macs(model, (3, 32, 32)), count_params_and_macs(rebuilt, (3, 32, 32))
    assert thin["params_dense"] < masked["params_dense"] and thin["macs_dense"] < masked["macs_dense"]
