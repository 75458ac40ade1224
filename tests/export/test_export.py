"""Exports: dense-with-zeros weights, params/MACs accounting, physically thinned models (equal
to the masked ones on every arch family), their files, the CLI, N:M checks."""
import hashlib
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bip.pruning import masking
from bip.models.accounting import count_params_and_macs
from bip.export.run import dense_state_dict, export_thin, main
from bip.export import load_thinned
from bip.pruning.layers import MaskedConv2d, MaskedLinear
from bip.models import create_model
from bip.export.thin import channel_groups, thin
from bip.export.modules import ChannelScatter, FoldedConv2d


def randomize_bn(model: nn.Module, seed: int = 1) -> None:
    """Random BN statistics and affine parameters, so a pruned filter's channel is a nonzero
    constant (of either sign) after BN + ReLU and folding it is actually tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))


def masked_model(arch: str, layer_type: str, k: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(arch, 10, layer_type)
    randomize_bn(model, seed + 1)
    masking.init_scores(model, "kaiming")  # random per-layer masks: the hardest coupling case
    masking.refresh_masks(model, k)
    return model.eval()


def test_dense_export_reproduces_the_pruned_model(tmp_path):
    torch.manual_seed(0)
    pruned = create_model("resnet20s", 10, "filter")
    masking.init_scores(pruned, "magnitude")
    masking.refresh_masks(pruned, 0.5)
    dense = create_model("resnet20s", 10, "dense")
    dense.load_state_dict(dense_state_dict(pruned))  # strict: exactly the dense keys
    pruned.eval()
    dense.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dense(x), pruned(x))
    conv = masking.masked_layers(pruned)[1][1]
    zero_filters = conv.mask.flatten(1).sum(1) == 0
    assert zero_filters.any() and torch.all(dense.get_submodule(masking.masked_layers(pruned)[1][0])
                                            .weight[zero_filters] == 0)


def test_macs_count_kept_weights():
    model = create_model("resnet20s", 10, "unstructured")
    counts = count_params_and_macs(model, (3, 32, 32))
    assert counts["params_dense"] == counts["params_effective"] == 269_722
    assert counts["macs_dense"] == 40_551_040  # resnet20: ~41M multiply-accumulates
    masking.init_scores(model, "magnitude")
    masking.refresh_masks(model, 0.1)
    counts = count_params_and_macs(model, (3, 32, 32))
    assert counts["params_dense"] - counts["params_effective"] == 268_336 - masking.keep_count(0.1, 268_336)
    assert counts["macs_effective"] < 0.3 * counts["macs_dense"]


# One arch per registered family (resnet_s, CIFAR ResNet basic and bottleneck, ImageNet ResNet,
# vgg_bn, WRN), at the smallest input that reaches their last stage.
FAMILIES = [("resnet20s", 32), ("resnet18", 16), ("ResNet18", 32), ("vgg11_bn", 32), ("wrn_40_2", 16)]
CASES = [(arch, size, layer_type, k) for arch, size in FAMILIES for layer_type in ("filter", "channel")
         for k in (0.5, 0.2)]
CASES += [("resnet50", 16, layer_type, 0.5) for layer_type in ("filter", "channel")]  # bottlenecks (slower)


@pytest.mark.parametrize("arch,size,layer_type,k", CASES)
def test_thinned_equals_masked(arch, size, layer_type, k, tmp_path):
    model = masked_model(arch, layer_type, k)
    shape = (3, size, size)
    meta = {"arch": arch, "num_classes": 10}
    thinned, content, summary = export_thin(model, shape, meta)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        expected = model(x)
        assert (thinned(x) - expected).abs().max() <= 1e-4
        # The saved form (weights_only, no pickled modules) rebuilds the same function.
        torch.save(content, tmp_path / "thin.pt")
        rebuilt = load_thinned(tmp_path / "thin.pt")
        assert (rebuilt(x) - expected).abs().max() <= 1e-4
    params, macs = summary["params"], summary["macs"]
    assert params["thin"] == sum(p.numel() for p in thinned.parameters()) < params["dense"]
    assert macs["thin"] == count_params_and_macs(thinned, shape)["macs_dense"]
    # Thinning removes most of what the masks removed; coupling keeps the rest as zeros.
    assert macs["thin"] - macs["zero_kept"] <= macs["effective"]
    assert macs["thin"] < (0.8 if k == 0.5 else 0.5) * macs["dense"]
    if layer_type == "filter":  # random BN shifts: some removed channel was a nonzero constant
        assert any(isinstance(m, FoldedConv2d) for m in thinned.modules())


def test_folding_the_constants_is_what_makes_it_exact():
    model = masked_model("resnet18", "filter", 0.5)
    thinned, _, _ = thin(model, torch.randn(1, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (thinned(x) - model(x)).abs().max() <= 1e-4
        for m in thinned.modules():
            if isinstance(m, FoldedConv2d):
                m.fold_kernel.zero_()
        assert (thinned(x) - model(x)).abs().max() > 1e-2


def test_align_keeps_layer_widths_multiples_of_8():
    model = masked_model("resnet18", "filter", 0.2)
    thinned, _, report = thin(model, torch.randn(1, 3, 16, 16), align=8)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (thinned(x) - model(x)).abs().max() <= 1e-4
    widths = [m.out_channels for m in thinned.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths) and min(widths) < 64


def group_consistent_filter_masks(model: nn.Module, example, keep_fraction=0.5, seed=0):
    """Filter masks with one decision per coupled channel group (bip.export.thin.channel_groups)."""
    groups = channel_groups(model, example)
    g = torch.Generator().manual_seed(seed)
    ids = sorted({i for ids in groups.values() for i in ids if i >= 0})
    keep = dict(zip(ids, (torch.rand(len(ids), generator=g) < keep_fraction).tolist()))
    for name, m in masking.masked_layers(model):
        filters = torch.tensor([keep.get(i, True) for i in groups[name]])
        filters[0] = True  # no layer dies completely
        m.mask.copy_(filters.view(-1, 1, 1, 1).expand_as(m.mask))


@pytest.mark.parametrize("arch,size", [("resnet20s", 32), ("resnet18", 16)])
def test_coupled_groups_pruned_together_leave_the_model(arch, size):
    """Residual-stream channels (shortcuts, option-A zero pads, the classifier's inputs) go
    when every layer that writes them pruned them; then coupling keeps nothing."""
    model = masked_model(arch, "filter", 1.0)
    example = torch.randn(1, 3, size, size)
    group_consistent_filter_masks(model, example)
    thinned, spec, report = thin(model, example)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert (thinned(x) - model(x)).abs().max() <= 1e-4
    assert report["macs_zero_kept"] == 0
    assert thinned.fc.in_features < model.fc.in_features  # the last stage's stream got thinner
    assert thinned.layer1[0].bn2.num_features < model.layer1[0].bn2.num_features
    if arch == "resnet20s":
        shortcut = thinned.layer2[0].shortcut
        assert isinstance(shortcut, ChannelScatter) and 0 < len(shortcut.src) < 16
        assert any(e["kind"] == "channel_scatter" for e in spec)


class Branchy(nn.Module):
    """Not in the registry: concat, a channel-mixing op, a broadcast multiply, a shared tail."""

    def __init__(self):
        super().__init__()
        self.a = MaskedConv2d(3, 8, 3, padding=1, granularity="filter")
        self.b = MaskedConv2d(3, 8, 1, granularity="filter")
        self.bn = nn.BatchNorm2d(16)
        self.c = MaskedConv2d(16, 12, 3, padding=1, granularity="filter")
        self.bn_c = nn.BatchNorm2d(12)
        self.d = MaskedConv2d(12, 12, 3, stride=2, granularity="channel")
        self.fc = MaskedLinear(12 * 7 * 7, 5)

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        z = F.relu(self.bn_c(self.c(y)))
        z = z * torch.sigmoid(z.mean(1, keepdim=True))  # channel-mixing gate: pins its input
        return self.fc(torch.flatten(self.d(z), 1))


def test_thin_works_on_graphs_outside_the_registry():
    torch.manual_seed(0)
    model = Branchy()
    randomize_bn(model)
    masking.refresh_masks(model, 0.5)
    model.eval()
    thinned, _, report = thin(model, torch.randn(1, 3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert (thinned(x) - model(x)).abs().max() <= 1e-4
    assert thinned.c.in_channels == 8  # concat of two half-pruned convs
    assert thinned.c.out_channels == 12 and thinned.d.in_channels == 12  # pinned by the gate
    assert report["channel_groups_removed"] > 0


def test_untraceable_models_fail_with_one_line():
    from bip.errors import BipError

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x  # control flow on values: fx cannot trace

    with pytest.raises(BipError, match="cannot thin DataDependent: torch.fx cannot trace it"):
        thin(DataDependent(), torch.randn(1, 3, 8, 8))


def test_thin_torchvision_resnet_with_zeroed_filters(tmp_path):
    """A dense model with exact zeros (no bip layers at all) thins too, and rebuilds from a
    template that is not in the registry."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    randomize_bn(model)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and name.endswith("conv1") and "." in name:
                m.weight[::2] = 0  # half the filters of each block's first conv
    x = torch.randn(2, 3, 32, 32)
    thinned, content, _ = export_thin(model, (3, 32, 32), {"arch": "tv:resnet18", "num_classes": 10})
    torch.save(content, tmp_path / "thin.pt")
    rebuilt = load_thinned(tmp_path / "thin.pt", model=torchvision.models.resnet18(num_classes=10))
    with torch.no_grad():
        assert (rebuilt(x) - model(x)).abs().max() <= 1e-4
    assert rebuilt.layer1[0].conv1.out_channels == 32


def test_load_thinned_rejects_other_files(tmp_path):
    from bip.errors import BipError
    torch.save({"format": "something-else"}, tmp_path / "x.pt")
    with pytest.raises(BipError, match="not a thinned model"):
        load_thinned(tmp_path / "x.pt")
    with pytest.raises(BipError, match="not found"):
        load_thinned(tmp_path / "missing.pt")


def test_export_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "not a finished run" in capsys.readouterr().err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny pretrain -> omp prune (filter, k = 0.5) and an unstructured one."""
    from bip.config import identity
    from bip.config import load_config
    from bip.train import train
    root = tmp_path_factory.mktemp("runs")
    base = ["data.dataset=synthetic", "data.synthetic_size=128", "data.batch_size=32",
            "train.epochs=1", f"run.result_dir={root}"]
    pre = load_config([], base)
    train(pre)
    out = {}
    for layer_type, k in (("filter", 0.5), ("unstructured", 0.2)):
        prune = load_config([], base + ["run.stage=prune", "prune.method=omp", f"prune.k={k}",
                                        f"prune.layer_type={layer_type}",
                                        f"run.parent={identity.run_id(pre)}"])
        train(prune)
        out[layer_type] = identity.run_dir(prune)
    return root, out


def test_export_cli_on_a_run(runs):
    run_dir = runs[1]["unstructured"]
    assert main([str(run_dir)]) == 0
    state = torch.load(run_dir / "dense.pt", weights_only=True)
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() > 1]
    kept = sum(int(w.count_nonzero()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(kept - 0.2) < 1e-3


def test_export_cli_thin_writes_files_and_index_columns(runs, capsys):
    from launch.collect import collect
    root, dirs = runs
    run_dir = dirs["filter"]
    result_before = hashlib.sha256((run_dir / "result.json").read_bytes()).hexdigest()
    assert main([str(run_dir), "--thin", "--onnx", "--latency", "2"]) == 0
    doc = json.loads((run_dir / "export.json").read_text())
    assert hashlib.sha256((run_dir / "result.json").read_bytes()).hexdigest() == result_before
    assert doc["max_abs_diff"] <= 1e-4 and doc["params"]["thin"] < doc["params"]["dense"]
    assert doc["size_bytes"]["thin"] < doc["size_bytes"]["dense"] < doc["size_bytes"]["masked"]
    assert set(doc["latency"]["batches"]["2"]) == {"dense_ms", "masked_ms", "thin_ms", "speedup"}
    assert doc["latency_device"].startswith("cpu") and doc["latency_batch"] == 2
    model = load_thinned(run_dir / "thin.pt")
    x = torch.randn(3, 3, 32, 32)
    program = torch.export.load(run_dir / "thin.pt2")
    torch.testing.assert_close(program.module()(x), model(x))
    if doc["files"].get("onnx"):
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(run_dir / "thin.onnx"))
        y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(y), model(x).detach(), atol=1e-4, rtol=1e-4)
    rows = {row["path"]: row for row in __import__("csv").DictReader(open(collect(root)))}
    row = rows[str(run_dir.relative_to(root))]
    assert float(row["latency_ms"]) == doc["latency_ms"] and float(row["speedup"]) == doc["speedup"]
    assert int(row["macs_thin"]) == doc["macs"]["thin"] and row["latency_device"]


def test_export_reads_the_published_final_pt_when_there_is_one(runs, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(runs[1]["unstructured"], run_dir)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    final = {"format": "bip-final-1", "meta": ckpt["meta"],
             "model": {k: v + 1 if k == "fc.bias" else v for k, v in ckpt["model"].items()}}
    torch.save(final, run_dir / "final.pt")
    assert main([str(run_dir)]) == 0
    dense = torch.load(run_dir / "dense.pt", weights_only=True)
    torch.testing.assert_close(dense["fc.bias"], ckpt["model"]["fc.bias"] + 1)


def test_export_cli_thin_refuses_unstructured_and_touches_nothing(runs, capsys):
    run_dir = runs[1]["unstructured"]
    before = sorted(p.name for p in run_dir.iterdir())
    assert main([str(run_dir), "--thin"]) == 2
    assert "needs a filter or channel run" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == before


def _files(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# A CUDA device this machine does not have.
NO_GPU = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("argv,message", [
    (["--thin", "--input-size", "-3"], "--input-size=-3 is out of range [1, 4096]"),
    (["--input-size", "100000"], "--input-size=100000 is out of range"),
    (["--device", NO_GPU, "--latency", "1"], f"--device={NO_GPU}: "),
    (["--device", NO_GPU], f"--device={NO_GPU}: "),
    (["--device", "foo", "--latency", "1"], "--device='foo' is not a device; use cpu, cuda or cuda:N"),
    (["--device", "foo"], "--device='foo' is not a device"),
    (["--latency", "1000000000"], "--latency: batch size 1000000000 is out of range [1, 4096]"),
    (["--latency", "4096", "--input-size", "1024"], "is 48.0 GiB (at most 4 GiB)"),
])
def test_export_cli_checks_every_option_before_writing(runs, tmp_path, capsys, argv, message):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(runs[1]["filter"], run_dir)
    before = _files(run_dir)
    assert main([str(run_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert _files(run_dir) == before


def test_an_export_that_fails_half_way_leaves_the_folder_as_it_was(runs, tmp_path, monkeypatch):
    import shutil
    from bip.export import run as export_module
    run_dir = tmp_path / "run"
    shutil.copytree(runs[1]["filter"], run_dir)
    assert main([str(run_dir)]) == 0  # an earlier export: dense.pt and export.json
    before = _files(run_dir)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in the middle of the export")
    monkeypatch.setattr(export_module, "measure", broken)  # after dense.pt and thin.pt
    with pytest.raises(RuntimeError, match="out of memory"):
        main([str(run_dir), "--thin", "--onnx", "--latency", "1"])
    assert _files(run_dir) == before  # no thin.pt, thin.pt2, temp file or new dense.pt


def test_nm_pattern_is_checked_and_cpu_exports_dense(capsys):
    from bip.export.nm import check_pattern, nm_export
    model = create_model("resnet20s", 10, "unstructured")
    for name, m in masking.masked_layers(model):
        if m.mask.dim() == 4 and m.in_channels % 4 == 0:  # 2 of every 4 input channels per position
            keep = (torch.arange(m.in_channels) % 4 < 2).view(1, 1, 1, -1)
            m.mask.copy_(keep.expand(m.out_channels, *m.kernel_size, -1).permute(0, 3, 1, 2))
    found = check_pattern(model, 2, 4)
    assert "conv1" in found["not_multiple"] and "fc" in found["other"]  # 3 inputs; fc untouched
    assert "layer1.0.conv1" in found["nm"] and len(found["nm"]) == 18
    lines = []
    doc = nm_export(model, {"n": 2, "m": 4}, "cpu", lines.append)
    assert doc["format"] == "dense-with-zeros" and doc["converted"] == []
    assert "dense-with-zeros" in lines[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_thinned_and_nm_on_cuda():
    from bip.export.latency import compare
    from bip.export.nm import sparse_kernels_available, to_semi_structured
    model = masked_model("resnet18", "filter", 0.5)
    thinned, _, _ = thin(model, torch.randn(1, 3, 32, 32))
    ms = compare({"masked": model, "thin": thinned}, (3, 32, 32), 64, "cuda", repeats=3)
    assert ms["thin"] > 0
    device = torch.device("cuda")
    if sparse_kernels_available(device):
        net = nn.Sequential(MaskedLinear(256, 256), nn.ReLU(), MaskedLinear(256, 128))
        for m in net:
            if isinstance(m, MaskedLinear):
                m.mask.copy_((torch.arange(256) % 4 < 2).expand_as(m.mask))
        sparse, converted = to_semi_structured(net, ["0", "2"], device)
        x = torch.randn(64, 256, device=device, dtype=torch.bfloat16)
        dense = net.to(device, torch.bfloat16)
        assert converted == ["0", "2"]
        torch.testing.assert_close(sparse(x), dense(x), atol=5e-2, rtol=5e-2)


# -- a grid's export stage -------------------------------------------------------------------

def export_grid(folder, export, **doc):
    import yaml
    tiny = {"dataset": "synthetic", "data.synthetic_size": 128, "data.batch_size": 32, "epochs": 1,
            "arch": "resnet20s", "data.num_workers": 0, "train.steps_per_epoch": 2}
    grid = {"name": "ex", "profile": "local", "set": tiny,
            "stages": {"pretrain": {}, "prune": {}, "finetune": {"methods": ["hydra"]}, "export": export},
            "axes": {"method": ["hydra", "omp"], "layer_type": ["filter", "unstructured"], "k": [0.5],
                     "seed": [1]}, **doc}
    path = folder / "ex.yml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


@pytest.mark.parametrize("export,message", [
    ({"thinn": True}, "unknown key 'thinn' (did you mean thin?)"),
    ({"latency": [0]}, "stages.export.latency: batch size 0 is out of range [1, 4096]"),
    ({"onnx": "yes"}, "stages.export.onnx must be bool, got 'yes'"),
])
def test_grid_export_options_are_checked(tmp_path, export, message):
    from bip.errors import BipError
    from launch import sweep
    with pytest.raises(BipError, match=__import__("re").escape(message)):
        sweep.load_grid(export_grid(tmp_path, export), tmp_path)


def test_grid_export_stage_thins_the_last_run_of_structured_cells(tmp_path, capsys):
    from launch import grid, sweep
    path, root = export_grid(tmp_path, {"thin": True, "latency": [2]}), tmp_path / "runs"
    plan = sweep.load_grid(path, root)
    exported = {run.key: run.export for run in plan.all_runs() if run.export}
    # the leaves: hydra's finetunes and omp's prunes, for both layer types; thin only for filter
    assert sorted((plan.dir(k).parent.name.split("-")[2], e["thin"]) for k, e in exported.items()) == \
        [("finetune", False), ("finetune", True), ("prune", False), ("prune", True)]
    assert grid.main([str(path), "--root", str(root), "--debug"]) == 0
    rows = {r["path"]: r for r in __import__("csv").DictReader(open(root / "index.csv"))}
    for key, options in exported.items():
        doc = json.loads((plan.dir(key) / "export.json").read_text())
        assert ("thin" in doc["files"]) == options["thin"] and doc["latency_batch"] == 2
        assert rows[key]["latency_ms"] and (rows[key]["macs_thin"] != "") == options["thin"]
    assert not any((plan.dir(r) / "export.json").exists() for r in plan.all_runs() if not r.export)


@pytest.mark.parametrize("change,message", [
    ({"export": {"input_size": -5}}, "grid ex: stages.export.input_size=-5 is out of range [1, 4096]"),
    ({"export": {"latency": [1000000000]}}, "stages.export.latency: batch size 1000000000 is out of range"),
    ({"export": {"onnx": True, "thin": False}}, "grid ex: stages.export.onnx needs stages.export.thin"),
    ({"export": {"nm_sparse": True}, "axes": {"method": ["omp"], "layer_type": ["unstructured"], "k": [0.5]}},
     "grid ex: stages.export.nm_sparse needs N:M cells (layer_type nm); this grid's are unstructured"),
    ({"export": {"latency": [2]}, "stages": {"pretrain": {}}, "axes": {"seed": [1]}},
     "grid ex: stages.export needs a prune stage"),
])
def test_grid_export_options_are_refused_at_dry_run(tmp_path, capsys, change, message):
    from launch import grid
    doc = {k: v for k, v in change.items() if k != "export"}
    if "stages" in doc:
        doc["stages"] = {**doc["stages"], "export": change["export"]}
    path, root = export_grid(tmp_path, change["export"], **doc), tmp_path / "runs"
    assert grid.main([str(path), "--root", str(root), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not root.exists()


def test_an_nm_grid_exports_nm_sparse_only_where_the_cell_is_nm_and_launch_needs_no_torch(tmp_path):
    import subprocess
    import sys
    from launch import sweep
    path = export_grid(tmp_path, {"nm_sparse": True, "latency": [2]},
                       axes={"method": ["omp"], "layer_type": ["nm", "unstructured"], "k": [0.5]})
    plan = sweep.load_grid(path, tmp_path / "runs")
    assert sorted((r.cfg.prune.layer_type, r.export["nm_sparse"]) for r in plan.all_runs() if r.export) == \
        [("nm", True), ("unstructured", False)]
    # The launcher checks export options with bip.export.options: importing it loads no torch.
    code = ("import sys; from launch import grid, sweep; sweep.load_grid(sys.argv[1], sys.argv[2]); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "runs")],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
