"""Layer collapse: empty layers and disconnected networks are detected, recorded per epoch and in
result.json, and prevented by the per-layer floor."""
import json

import pytest
import torch

from bip.pruning import collapse, masking
from bip.config import identity
from bip.config import load_config
from bip.errors import BipError
from bip.methods.registry import create_method
from bip.models import create_model
from bip.testing.synccheck import SyncRecorder
from bip.train import train

SHAPE = (3, 16, 16)


def _model():
    torch.manual_seed(0)
    model = create_model("resnet20s", 10, "unstructured")
    masking.init_scores(model, "magnitude")
    masking.refresh_masks(model, 0.5)
    return model.eval()


@pytest.mark.parametrize("layer,cut", [("conv1", True), ("fc", True), ("layer1.0.conv1", False),
                                       ("layer3.2.conv2", False)])
def test_hand_made_masks(layer, cut):
    model = _model()
    assert not collapse.disconnected(model, SHAPE) and collapse.empty_layers(model) == []
    model.get_submodule(layer).mask.zero_()
    # A residual block's conv can be empty while the shortcut still carries the input.
    assert collapse.disconnected(model, SHAPE) is cut
    assert collapse.empty_layers(model) == [layer]
    rec = collapse.record(model, SHAPE, "epoch 1", log=lambda line: None)
    assert rec == {"collapsed": cut, "collapsed_layers": [layer]}
    if cut:
        with pytest.raises(BipError, match="disconnected"):
            collapse.enforce(rec, "fail", "epoch 1")
    collapse.enforce(rec, "warn", "epoch 1")


def test_kept_units_are_device_tensors_without_sync():
    model = create_model("resnet20s", 10, "filter")
    masking.refresh_masks(model, 0.5)
    with SyncRecorder() as rec:
        kept = collapse.kept_units(model)
    assert rec.events == [] and kept.shape == (19,)
    assert kept.tolist()[0] == 8  # 8 of conv1's 16 filters


def _batch(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, *SHAPE, generator=g), torch.randint(0, 10, (8,), generator=g)


def _hydra(k, *extra):
    torch.manual_seed(0)
    model = create_model("resnet20s", 10, "unstructured")
    cfg = load_config([], ["run.stage=prune", "prune.layer_type=unstructured", "prune.method=hydra",
                           f"prune.k={k}", "prune.score_init=magnitude", "optim.lr=1", *extra])
    method = create_method(cfg, model)
    for i in range(3):
        method.step([_batch(i)], i / 3)
    return model


def test_short_hydra_run_at_tiny_k_collapses_and_the_floor_prevents_it():
    model = _hydra(4e-5)  # 11 weights for 20 layers: most layers must be empty
    assert len(collapse.empty_layers(model)) >= 9 and collapse.disconnected(model, SHAPE)
    model = _hydra(2e-4)  # empty residual convs; the option-A shortcuts still carry the input
    assert len(collapse.empty_layers(model)) >= 10 and not collapse.disconnected(model, SHAPE)
    for floor in ("0.0001", "1"):  # ceil(0.0001 * n) and 1 weight per layer, out of 54
        model = _hydra(2e-4, f"prune.min_layer_keep={floor}")
        report = masking.sparsity_report(model)
        assert report["kept"] == masking.keep_count(2e-4, report["total"]) == 54
        assert collapse.empty_layers(model) == []


def test_train_records_collapse_per_epoch_and_fails_when_asked(tmp_path):
    base = ["data.dataset=synthetic", "data.synthetic_size=128", "data.batch_size=32",
            "train.epochs=1", f"run.result_dir={tmp_path}"]
    pre = load_config([], base)
    train(pre)
    prune = base + ["run.stage=prune", "prune.method=hydra", "prune.layer_type=unstructured",
                    "prune.k=1e-5", f"run.parent={identity.run_id(pre)}"]
    cfg = load_config([], prune)
    result = train(cfg)
    assert result["collapsed"] is True and {"conv1", "fc"} & set(result["collapsed_layers"])
    row = json.loads((identity.run_dir(cfg) / identity.METRICS).read_text().splitlines()[-1])
    assert row["collapsed"] is True and row["collapsed_layers"] == result["collapsed_layers"]
    # on_collapse does not change what a run computes (not in the run id): a fresh folder
    with pytest.raises(BipError, match="on_collapse=fail"):
        train(load_config([], prune + ["prune.on_collapse=fail"]), tmp_path / "fail")
    assert json.loads((tmp_path / "fail" / identity.METRICS).read_text())["collapsed"] is True
