"""The training step never waits for the host: one step of every method and layer type runs
under bip.testing.synccheck.SyncRecorder and must record no host sync (item, int(), nonzero, boolean
indexing, bincount, data-dependent shapes, host reads). Batches are tensors made here; the
loaders have their own sync test."""
import pytest
import torch

from bip.methods.registry import create_method
from bip.models import create_model
from bip.testing.synccheck import SyncRecorder
from helpers import image_batches, method_config

PRUNED = ["unstructured", "filter", "channel", "nm"]
STEPPED = ["finetune", "hydra", "bip", "bip-fused", "bip-reference"]


def syncs_per_step(method: str, layer_type: str, extra=()) -> list[tuple[str, str]]:
    """Host syncs recorded during one step (for one-shot methods: during their setup, which
    computes the mask), after one warm-up step."""
    torch.manual_seed(0)
    cfg = method_config(method, layer_type, extra)
    model = create_model("resnet20s", 10, "dense" if method == "dense" else layer_type)
    if method in ("omp", "random"):
        with SyncRecorder() as rec:
            create_method(cfg, model)
        return rec.events
    m = create_method(cfg, model)
    m.on_epoch_start(0)
    batches = image_batches(m.streams)
    m.step(batches, 0.0)  # warm-up: first-step allocations are not the steady state
    with SyncRecorder() as rec:
        stats = m.step(batches, 0.1)
    assert set(stats) >= {"loss", "correct", "n"}
    return rec.events


def test_dense_pretrain_step_is_sync_free():
    assert syncs_per_step("dense", "dense") == []


@pytest.mark.parametrize("layer_type", PRUNED)
@pytest.mark.parametrize("method", STEPPED + ["omp", "random"])
def test_step_is_sync_free(method, layer_type):
    events = syncs_per_step(method, layer_type)
    shown = "; ".join(f"{op} at {where}" for op, where in events[:6])
    assert events == [], f"{len(events)} host syncs: {shown}"


@pytest.mark.parametrize("method,extra", [
    ("hydra", ["prune.scope=layer"]),
    ("bip", ["prune.min_layer_keep=0.01", "prune.skip=first,classifier"]),
    ("bip-fused", ["prune.min_layer_keep=0.01", "prune.skip=first,classifier"]),
    ("bip-reference", ["prune.min_layer_keep=2"]),
] + [(m, ["run.diagnostics=step", "prune.score_step_clip=0.01", "prune.hysteresis=0.1",
          "prune.refresh_every=2", "prune.ramp_epochs=1"]) for m in ("hydra", "bip", "bip-fused")])
def test_budget_options_are_sync_free(method, extra):
    assert syncs_per_step(method, "unstructured", extra) == []
