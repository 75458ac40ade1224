"""Run ids of a dozen configs, computed by commit 37efb6d (before the subpackage layout): an id
names a run folder, so a refactor that changes one orphans every existing run of it."""
import pytest

from bip.config import identity, load_config

PINNED = [
    ([], "CIFAR10-resnet20s-pretrain-dense-bf21a9e8fb"),
    (["data.dataset=digits", "model.arch=resnet20s", "train.epochs=20"], "digits-resnet20s-pretrain-dense-a81669f2b8"),
    (["data.dataset=CIFAR100", "model.arch=vgg16_bn", "optim.lr=0.05"], "CIFAR100-vgg16_bn-pretrain-dense-ad1a32351b"),
    (["run.stage=prune", "prune.layer_type=unstructured", "prune.k=0.1", "prune.method=bip"], "CIFAR10-resnet20s-prune-bip-0e6603b6f9"),
    (["run.stage=prune", "prune.layer_type=unstructured", "prune.k=0.1", "prune.method=bip", "bip.variant=reference"], "CIFAR10-resnet20s-prune-bip-02fe4f178d"),
    (["run.stage=prune", "prune.layer_type=unstructured", "prune.k=0.1", "prune.method=bip", "bip.gamma=3.0", "bip.alpha=0.02"], "CIFAR10-resnet20s-prune-bip-fb19346072"),
    (["run.stage=prune", "prune.layer_type=filter", "prune.k=0.5", "prune.method=hydra"], "CIFAR10-resnet20s-prune-hydra-0dd38cde9c"),
    (["run.stage=prune", "prune.layer_type=unstructured", "prune.k=0.1", "prune.method=hydra", "prune.variant=reference"], "CIFAR10-resnet20s-prune-hydra-0a71f074c8"),
    (["run.stage=prune", "prune.layer_type=unstructured", "prune.k=0.1", "prune.method=hydra", "prune.score_init=magnitude"], "CIFAR10-resnet20s-prune-hydra-eea403f10f"),
    (["run.stage=prune", "prune.layer_type=channel", "prune.k=0.3", "prune.method=omp"], "CIFAR10-resnet20s-prune-omp-6ad1387072"),
    (["run.stage=prune", "prune.layer_type=unstructured", "prune.k=0.1", "prune.method=random"], "CIFAR10-resnet20s-prune-random-f051618557"),
    (["run.stage=prune", "prune.layer_type=unstructured", "prune.k=0.1", "prune.method=imp", "run.parent=CIFAR10-resnet20s-pretrain-dense-bf21a9e8fb"], "CIFAR10-resnet20s-prune-imp-f63fa8a5a9"),
    (["run.stage=prune", "prune.layer_type=nm", "prune.method=omp", "prune.n=2", "prune.m=4"], "CIFAR10-resnet20s-prune-omp-d8b0493eb7"),
    (["run.stage=finetune", "prune.layer_type=unstructured", "prune.k=0.05", "prune.method=bip", "run.parent=abc"], "CIFAR10-resnet20s-finetune-bip-76289c8f7f"),
    (["run.stage=finetune", "prune.layer_type=unstructured", "prune.k=0.02", "prune.method=omp", "train.mixed_precision=bf16", "run.parent=abc"], "CIFAR10-resnet20s-finetune-omp-cb65c04c2b"),
]


@pytest.mark.parametrize("overrides, run_id", PINNED)
def test_run_ids_are_those_of_the_flat_layout(overrides, run_id):
    assert identity.run_id(load_config([], overrides)) == run_id
