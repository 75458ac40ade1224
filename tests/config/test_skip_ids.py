"""One model, one id: spellings of the same prune.skip layers, and N:M fields an unstructured run
never reads, give one run id; the canonical spellings keep the ids they had before."""
import pytest
import torch
import torch.nn as nn

from bip.config import PruneConfig, identity, load_config, names
from bip.errors import BipError
from bip.pruning import masking

PRUNE = ["run.stage=prune", "prune.layer_type=unstructured", "prune.k=0.1", "prune.method=hydra"]

# canonical spelling -> (its id, computed before canonicalisation; other spellings of it)
PINNED = {
    "first": ("CIFAR10-resnet20s-prune-hydra-51609e8f5c", ["conv1", "first,conv1", "conv1,first, first"]),
    "classifier,first": ("CIFAR10-resnet20s-prune-hydra-6fab654b1b",
                         ["first,classifier", "conv1,fc", "first,last", "last,conv1,classifier,fc"]),
    "layer1.0.conv1": ("CIFAR10-resnet20s-prune-hydra-508bc6c454", ["layer1.0.conv1,layer1.0.conv1"]),
}


@pytest.mark.parametrize("canonical", sorted(PINNED))
def test_spellings_of_the_same_layers_share_the_pinned_id(canonical):
    pinned, others = PINNED[canonical]
    for spelling in [canonical, *others]:
        cfg = load_config([], [*PRUNE, f"prune.skip={spelling}"])
        assert (cfg.prune.skip, identity.run_id(cfg)) == (canonical, pinned), spelling


def test_vgg_spells_its_ends_by_alias():
    cfg = load_config([], [*PRUNE, "model.arch=vgg16_bn", "prune.skip=features.0,last"])
    assert cfg.prune.skip == "classifier,first"


def test_nm_fields_do_not_split_ids_of_other_layer_types():
    plain = load_config([], PRUNE)
    assert identity.run_id(plain) == "CIFAR10-resnet20s-prune-hydra-5f6b584cf5"
    assert identity.run_id(plain.replace(**{"prune.n": 1, "prune.m": 8})) == identity.run_id(plain)
    finetune = load_config([], ["run.stage=finetune", "prune.layer_type=filter", "prune.k=0.5", "run.parent=x"])
    assert identity.run_id(finetune.replace(**{"prune.n": 3, "prune.m": 16})) == identity.run_id(finetune)
    nm = load_config([], ["run.stage=prune", "prune.layer_type=nm", "prune.method=omp", "prune.n=1", "prune.m=8"])
    assert identity.run_id(nm) == "CIFAR10-resnet20s-prune-omp-555541fea6"  # nm reads them: hashed


@pytest.mark.parametrize("arch", sorted(names.MODELS))
def test_the_catalogue_knows_each_built_in_models_ends(arch):
    """canonical_skip (no torch) and masking's spelling (from the model) agree on every model."""
    from bip.models import create_model
    with torch.device("meta"):
        model = create_model(arch, 10, "unstructured")
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert names.LAYER_ENDS[arch] == (convs[0], convs[-1])
    for spelling in ("first", "last", convs[0], convs[-1], f"{convs[1]},classifier", f"first,{convs[0]}"):
        expected = masking.skip_spelling(model, masking.resolve_skip(model, tuple(spelling.split(","))))
        assert names.canonical_skip(arch, spelling) == expected, spelling


def test_a_zoo_model_must_use_the_canonical_spelling():
    """tv:/timm: ends are only known once the model exists: the other spelling is refused."""
    from bip.models import create_model
    with torch.device("meta"):
        model = create_model("tv:resnet18", 10, "unstructured", input_size=32)
    assert load_config([], [*PRUNE, "model.arch=tv:resnet18", "prune.skip=fc"]).prune.skip == "fc"
    with pytest.raises(BipError, match="prune.skip='fc' selects the layers that prune.skip='classifier'"):
        masking.configure(model, PruneConfig(layer_type="unstructured", k=0.5, skip="fc"))
    masking.configure(model, PruneConfig(layer_type="unstructured", k=0.5, skip="classifier"))


@pytest.mark.parametrize("skip, ok", [("fc", False), ("classifier", True)])
def test_a_grid_dry_run_checks_a_zoo_models_spelling(tmp_path, capsys, skip, ok):
    import yaml

    from launch.grid import main as grid_main
    from tests.helpers import one_error_line
    grid = tmp_path / "grid.yml"
    grid.write_text(yaml.safe_dump({
        "name": "g", "profile": "local", "set": {"dataset": "synthetic", "arch": "tv:resnet18"},
        "stages": {"pretrain": {}, "prune": {"set": {"layer_type": "unstructured", "prune.skip": skip}}},
        "axes": {"method": ["hydra"], "k": [0.5], "seed": [1]}}))
    code = grid_main([str(grid), "--dry-run", "--root", str(tmp_path / "runs")])
    if ok:
        assert code == 0, capsys.readouterr().err
    else:
        assert code == 2
        one_error_line(capsys, "grid g: tv:resnet18: prune.skip='fc' selects the layers that "
                               "prune.skip='classifier' names")
