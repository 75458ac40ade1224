"""The sync recorder itself: it must see every kind of host sync, and nothing else."""
import torch

from bip.testing.synccheck import SyncRecorder


def _events(fn):
    with SyncRecorder() as rec:
        fn()
    return [op for op, _ in rec.events]


def test_records_each_kind_of_sync():
    x = torch.randn(16)
    cases = {
        "item": lambda: x[0].item(), "int": lambda: int(x.argmax()), "if": lambda: bool((x > 0).any()),
        "nonzero": lambda: x.nonzero(), "bool index": lambda: x[x > 0],
        "bool assign": lambda: x.__setitem__(x > 0, 0.0), "masked_select": lambda: x.masked_select(x > 0),
        "unique": lambda: torch.unique(x), "bincount": lambda: torch.bincount(torch.arange(4)),
        "tolist": lambda: x.tolist(), "numpy": lambda: x.numpy(), "equal": lambda: torch.equal(x, x),
    }
    for name, fn in cases.items():
        assert _events(fn), name


def test_device_only_ops_record_nothing():
    x = torch.randn(64, 8)
    def work():
        v = x.abs().flatten()
        t = v.kthvalue(10).values
        keep = (v >= t) & torch.isfinite(v)
        y = torch.where(keep, v, torch.zeros_like(v)).cumsum(0)
        idx = torch.arange(8)
        return x[idx], x.topk(3, dim=1).indices, y.sum(), len(x)
    assert _events(work) == []


def test_patches_are_undone():
    original = torch.Tensor.tolist
    with SyncRecorder():
        pass
    assert torch.Tensor.tolist is original
