"""Run identity: pinned hashes, what is and is not part of the id."""
import pytest

from bip.config import identity
from bip.config import load_config

PRUNE = ["run.stage=prune", "prune.layer_type=unstructured", "prune.k=0.1", "prune.method=bip"]


def test_pinned_ids():
    # Changing these breaks the link to every existing run folder: only ever on purpose.
    assert identity.run_id(load_config([], [])) == "CIFAR10-resnet20s-pretrain-dense-bf21a9e8fb"
    assert identity.run_id(load_config([], PRUNE)) == "CIFAR10-resnet20s-prune-bip-0e6603b6f9"


def test_seed_is_a_subfolder_and_paths_are_not_hashed(tmp_path):
    base = load_config([], PRUNE)
    other = base.replace(**{"run.seed": 5, "data.data_dir": "/elsewhere", "run.exp_name": "x",
                            "data.num_workers": 0, "run.result_dir": str(tmp_path)})
    assert identity.run_id(other) == identity.run_id(base)
    assert identity.run_dir(other).name == "seed_5" and identity.run_dir(other).parent.parent == tmp_path


@pytest.mark.parametrize("stage_overrides, change", [
    ([], {"prune.k": 0.5}),                                  # pretrain ignores prune.*
    ([], {"bip.gamma": 3.0}),
    (PRUNE, {"optim.lr": 0.5}),                              # paper BiP uses bip.alpha, not optim.lr
    (PRUNE, {"bip.lr2": 0.5}),                               # reference-only field
    (PRUNE[:-1] + ["prune.method=hydra"], {"bip.alpha": 0.5}),
    (PRUNE[:-1] + ["prune.method=omp"], {"train.epochs": 7}),  # one-shot trains nothing
])
def test_unused_fields_do_not_split_ids(stage_overrides, change):
    cfg = load_config([], stage_overrides)
    assert identity.run_id(cfg.replace(**change)) == identity.run_id(cfg)


@pytest.mark.parametrize("change", [{"prune.k": 0.2}, {"bip.gamma": 3.0}, {"train.epochs": 7},
                                    {"data.normalize": True}, {"run.parent": "x"}])
def test_result_affecting_fields_split_ids(change):
    cfg = load_config([], PRUNE)
    assert identity.run_id(cfg.replace(**change)) != identity.run_id(cfg)


def test_fused_variant_has_its_own_id_and_hashes_the_paper_fields():
    paper = load_config([], PRUNE)
    fused = load_config([], PRUNE + ["bip.variant=fused"])
    assert identity.run_id(load_config([], PRUNE + ["bip.variant=paper"])) == identity.run_id(paper)
    assert identity.run_id(fused) != identity.run_id(paper)
    assert identity.hashed_fields(fused)["bip.variant"] == "fused"  # the index's column labels it
    # fused reads the paper variant's fields (alpha, beta, gamma, ...), not optim.* or lr2
    assert identity.run_id(fused.replace(**{"bip.alpha": 0.5})) != identity.run_id(fused)
    assert identity.run_id(fused.replace(**{"bip.gamma": 3.0})) != identity.run_id(fused)
    assert identity.run_id(fused.replace(**{"optim.lr": 0.5})) == identity.run_id(fused)
    assert identity.run_id(fused.replace(**{"bip.lr2": 0.5})) == identity.run_id(fused)


def test_source_checkpoint_is_hashed_by_content(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "sub" / "b.pt"
    b.parent.mkdir()
    a.write_bytes(b"same weights")
    b.write_bytes(b"same weights")
    cfg = load_config([], PRUNE)
    id_a = identity.run_id(cfg.replace(**{"run.source_net": str(a)}))
    assert id_a == identity.run_id(cfg.replace(**{"run.source_net": str(b)}))
    b.write_bytes(b"other weights")
    assert id_a != identity.run_id(cfg.replace(**{"run.source_net": str(b)}))
