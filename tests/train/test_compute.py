"""Compute accounting (bip/compute.py): the passes a run reports are the forwards and backwards
its model actually ran (counted here with hooks), FLOPs follow from them, counters survive an
exact resume, and lineage sums follow the parent chain."""
import json

import pytest
import torch

from bip.train import compute
from bip.config import load_config
from bip.methods.registry import create_method
from bip.models import create_model
from bip.train import train

from helpers import image_batches, method_config


class _Counter:
    """Examples through the model's forward, and through a backward of its output."""

    def __init__(self, model):
        self.forward = self.backward = 0

        def on_forward(_module, inputs, output):
            self.forward += inputs[0].shape[0]
            if output.requires_grad:
                n = inputs[0].shape[0]
                output.register_hook(lambda g: self._back(n))
        model.register_forward_hook(on_forward)

    def _back(self, n):
        self.backward += n


# Per example and step: (forwards, backwards, train_passes).
EXPECTED = {"dense": (1, 1, 1), "finetune": (1, 1, 1), "hydra": (1, 1, 1),
            "hydra-reference": (1, 1, 1), "bip": (2, 2, 2), "bip-reference": (4, 3, 10 / 3),
            "omp": (0, 0, 0), "random": (0, 0, 0)}


@pytest.mark.parametrize("method", list(EXPECTED))
def test_counted_passes_equal_the_model_calls(method):
    torch.manual_seed(0)
    if method == "hydra-reference":
        cfg = method_config("hydra", "unstructured", ["prune.variant=reference"])
    else:
        cfg = method_config(method, "unstructured")
    model = create_model("resnet20s", 10, "dense" if method == "dense" else "unstructured")
    m = create_method(cfg, model)
    calls = _Counter(model)
    counts = compute.new()
    if not m.one_shot:
        m.on_epoch_start(0)
        batches = image_batches(m.streams)  # 4 examples per stream
        m.step(batches, 0.0)
    compute.add_step(counts, m.take_passes(), world=1)
    assert (counts["forward"], counts["backward"]) == (calls.forward, calls.backward)
    f, b, p = EXPECTED[method]
    n = 0 if m.one_shot else 4
    assert (calls.forward, calls.backward) == (f * n, b * n)
    assert compute.passes(counts) == pytest.approx(p * n, rel=1e-4)
    assert m.take_passes() == (0, 0)  # taken: the next step starts from zero
    compute.close_epoch(counts, macs_effective=1000)
    assert counts["flops"] == 2 * 1000 * (f * n + 2 * b * n)


def test_world_size_multiplies_local_counts():
    counts = compute.new()
    compute.add_step(counts, (4, 4), world=2)
    assert compute.passes(counts) == 8


def test_lineage_adds_the_parent_and_is_unknown_for_old_parents():
    counts = {**compute.new(), "forward": 30, "backward": 30, "flops": 600}
    own = compute.result_fields(counts, 2.0, None)
    assert own["lineage_train_passes"] == 30 and own["lineage_wall_time_s"] == 2.0
    child = compute.result_fields(counts, 1.0, own)
    assert child["lineage_train_passes"] == 60 and child["lineage_train_flops"] == 1200
    assert child["lineage_wall_time_s"] == 3.0
    assert compute.result_fields(counts, 1.0, {"wall_time_s": 5})["lineage_train_passes"] is None


def _data(tmp_path, *extra):
    return ["data.dataset=synthetic", "data.batch_size=8", "data.val_fraction=0.25",
            "model.arch=resnet20s", "run.print_freq=1", f"run.result_dir={tmp_path}",
            "data.num_workers=0", *extra]


def test_a_run_and_its_child_report_compute(tmp_path):
    """pretrain (dense) -> BiP prune: passes are steps x global batch x passes per example, the
    FLOPs use the run's effective MACs, the child's lineage adds the parent's result."""
    base = _data(tmp_path, "train.epochs=2", "train.steps_per_epoch=3")
    pre = train(load_config([], ["run.stage=pretrain", *base]))
    assert pre["train_passes"] == pre["train_forward_passes"] == 2 * 3 * 8
    assert pre["train_flops"] == 2 * pre["macs_dense"] * 3 * 2 * 3 * 8
    assert pre["lineage_train_passes"] == pre["train_passes"]
    parent = pre["run_id"]
    child = train(load_config([], ["run.stage=prune", "prune.method=bip", "prune.layer_type=unstructured",
                                   "prune.k=0.3", f"run.parent={parent}", *base]))
    assert child["train_passes"] == 2 * 2 * 3 * 8
    assert child["lineage_train_passes"] == pre["train_passes"] + child["train_passes"]
    assert child["lineage_train_flops"] == pre["train_flops"] + child["train_flops"]
    assert child["lineage_wall_time_s"] == pytest.approx(pre["wall_time_s"] + child["wall_time_s"], abs=2e-3)
    rows = [json.loads(line) for line in open(tmp_path / child["run_id"] / f"seed_{child['seed']}" / "metrics.jsonl")]
    assert [r["train_passes"] for r in rows] == [2 * 3 * 8 * e for e in (1, 2)]
    from launch.collect import collect
    import csv
    with open(collect(tmp_path), newline="") as f:
        rows = {row["run_id"]: row for row in csv.DictReader(f)}
    assert float(rows[child["run_id"]]["lineage_train_passes"]) == child["lineage_train_passes"]
    assert float(rows[parent]["train_flops"]) == pre["train_flops"]
    assert rows[child["run_id"]]["collapsed"] == str(child["collapsed"])
