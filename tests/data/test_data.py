"""Dataset readers (on files the tests write) and the reproducible, sharded loaders."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from bip.config import load_config
from bip.data.base import ArraySplit
from bip.data import load_dataset
from bip.data.loaders import build_loaders
from bip.data.base import split_indices
from bip.errors import BipError
from bip.testing.synccheck import SyncRecorder


def data_cfg(*overrides):
    return load_config([], list(overrides)).data


def _write_cifar(folder, n_per_batch=4, cifar100=False):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["train", "test"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    key = b"fine_labels" if cifar100 else b"labels"
    for name in names:
        batch = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 key: list(rng.integers(0, 100 if cifar100 else 10, n_per_batch))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


@pytest.mark.parametrize("layout", ["flat", "seed"])
def test_cifar10_pickles(tmp_path, layout):
    folder = tmp_path / ("cifar-10-batches-py" if layout == "flat" else "CIFAR10/cifar-10-batches-py")
    _write_cifar(folder)
    spec = load_dataset(data_cfg("data.dataset=CIFAR10", f"data.data_dir={tmp_path}"))
    assert spec.num_classes == 10 and len(spec.train) == 20 and len(spec.test) == 4
    assert spec.train.images.shape[1:] == (3, 32, 32) and spec.train.images.dtype == torch.uint8
    with open(folder / "data_batch_1", "rb") as f:
        first = pickle.load(f)
    assert torch.equal(spec.train.images[0].flatten(), torch.from_numpy(first[b"data"][0]))


def test_cifar100_and_corrupt_file(tmp_path):
    _write_cifar(tmp_path / "cifar-100-python", cifar100=True)
    spec = load_dataset(data_cfg("data.dataset=CIFAR100", f"data.data_dir={tmp_path}", "model.num_classes=100"))
    assert spec.num_classes == 100 and len(spec.train) == 4
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"\x80garbage")
    with pytest.raises(BipError, match="cannot read"):
        load_dataset(data_cfg("data.dataset=CIFAR100", f"data.data_dir={tmp_path}"))


def test_missing_data_folder_is_one_line(tmp_path):
    with pytest.raises(BipError, match="never downloaded"):
        load_dataset(data_cfg("data.dataset=CIFAR10", f"data.data_dir={tmp_path}"))
    with pytest.raises(BipError, match="unknown dataset 'CIFAR11'"):
        load_dataset(data_cfg("data.dataset=CIFAR11"))


def _jpeg(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((64, 64, 3), value, dtype=np.uint8)).save(path)


def test_tiny_imagenet_is_read_without_modifying_it(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]
    for c, wnid in enumerate(wnids):
        for i in range(3):
            _jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 40 * c + i)
    lines = []
    for i, wnid in enumerate(["n01", "n02", "n01"]):
        _jpeg(root / "val" / "images" / f"val_{i}.JPEG", 200 + i)
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    before = sorted(str(p) for p in root.rglob("*"))
    spec = load_dataset(data_cfg("data.dataset=TinyImageNet", f"data.data_dir={tmp_path}"))
    assert sorted(str(p) for p in root.rglob("*")) == before
    assert spec.num_classes == 2 and spec.image_size == 64
    assert spec.train.labels.tolist() == [0, 0, 0, 1, 1, 1]   # sorted wnids: n01 -> 0
    assert spec.test.labels.tolist() == [0, 1, 0]
    assert int(spec.test.images[1, 0, 0, 0]) in range(199, 204)  # JPEG of a flat 201


def test_imagenet_folder_through_dataloader(tmp_path):
    for split in ("train", "val"):
        for c in ("a", "b"):
            for i in range(4):
                _jpeg(tmp_path / split / c / f"{i}.jpg", 50 + 100 * (c == "b"))
    cfg = data_cfg("data.dataset=ImageNet", f"data.data_dir={tmp_path}", "data.image_size=32",
                   "data.batch_size=2", "data.num_workers=0", "data.val_fraction=0.25")
    spec = load_dataset(cfg)
    assert spec.num_classes == 2 and spec.style == "imagenet"
    loaders = build_loaders(cfg, spec, seed=0, streams=1, rank=0, world=1, device=torch.device("cpu"))
    x, y = next(iter(loaders.streams[0].epoch(0)))
    assert x.shape == (2, 3, 32, 32) and y.dtype == torch.int64
    assert sum(len(y) for _, y in loaders.test()) == 8 and loaders.val_size == 2


def test_digits_and_synthetic_are_offline_and_fixed():
    digits = load_dataset(data_cfg("data.dataset=digits"))
    assert digits.num_classes == 10 and len(digits.train) + len(digits.test) == 1797
    assert digits.train.images.shape[1:] == (3, 32, 32)
    a = load_dataset(data_cfg("data.dataset=synthetic", "data.synthetic_size=64"))
    b = load_dataset(data_cfg("data.dataset=synthetic", "data.synthetic_size=64"))
    assert torch.equal(a.train.images, b.train.images) and len(a.test) == 16
    assert load_dataset(data_cfg("data.dataset=synthetic"), num_classes=7).num_classes == 7


def test_validation_split_is_fixed_and_disjoint():
    train, val = split_indices(1000, 0.1, split_seed=0)
    train2, val2 = split_indices(1000, 0.1, split_seed=0)
    assert torch.equal(val, val2) and len(val) == 100 and len(train) == 900
    assert not set(train.tolist()) & set(val.tolist())
    small, _ = split_indices(1000, 0.1, split_seed=0, data_fraction=0.5)
    assert len(small) == 450 and set(small.tolist()) <= set(train.tolist())


def _loaders(rank=0, world=1, streams=2, *extra, batch=16, loader="tensor", seed=3, device="cpu"):
    cfg = data_cfg("data.dataset=synthetic", "data.synthetic_size=200", f"data.batch_size={batch}",
                   "data.normalize=true", "data.test_batch_size=7", f"data.loader={loader}", *extra)
    spec = load_dataset(cfg)
    return build_loaders(cfg, spec, seed=seed, streams=streams, rank=rank, world=world,
                         device=torch.device(device))


def test_epochs_are_reproducible_and_streams_differ():
    a, b = _loaders(), _loaders()
    xa, _ = next(iter(a.streams[0].epoch(4)))
    xb, _ = next(iter(b.streams[0].epoch(4)))
    assert torch.equal(xa, xb)                                  # same (seed, stream, epoch)
    assert not torch.equal(xa, next(iter(a.streams[1].epoch(4)))[0])   # BiP's second stream
    assert not torch.equal(xa, next(iter(a.streams[0].epoch(5)))[0])   # next epoch


def _epoch(stream, epoch, start=0):
    return [(x.clone(), y.clone()) for x, y in stream.epoch(epoch, start=start)]


def _gathered(shards):
    """The global batches from each rank's batches: rank r holds the r-th interleaved shard."""
    return [(torch.stack(xs, 1).flatten(0, 1), torch.stack(ys, 1).flatten(0, 1))
            for xs, ys in (zip(*step) for step in zip(*shards))]


def _bitwise(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                    for (xa, ya), (xb, yb) in zip(a, b))


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_loader_global_batch_is_the_same_for_any_world_size(world):
    # Augmented and normalised, both BiP streams, two epochs: the N shards of every global batch,
    # gathered, are bitwise the batch of one process with an N times larger batch.
    one = _loaders(0, 1, 2, batch=4 * world)
    ranks = [_loaders(r, world, 2, batch=4) for r in range(world)]
    assert len(one.streams[0]) == len(ranks[0].streams[0]) == 180 // (4 * world)
    assert one.global_batch == ranks[0].global_batch == 4 * world
    for stream in (0, 1):
        for epoch in (0, 1):
            whole = _epoch(one.streams[stream], epoch)
            assert _bitwise(_gathered([_epoch(r.streams[stream], epoch) for r in ranks]), whole)


def test_evaluation_shards_cover_each_sample_once_for_any_world_size():
    for name in ("val", "test"):
        x1, y1 = map(torch.cat, zip(*getattr(_loaders(), name)()))
        for world in (2, 4):
            parts = [list(getattr(_loaders(r, world), name)()) for r in range(world)]
            # rank r holds samples r, r + world, ...: put them back; no padding, no repeats
            order = torch.cat([torch.arange(r, len(y1), world) for r in range(world)])
            x2, y2 = torch.empty_like(x1), torch.empty_like(y1)
            x2[order] = torch.cat([x for p in parts for x, _ in p])
            y2[order] = torch.cat([y for p in parts for _, y in p])
            assert torch.equal(x2, x1) and torch.equal(y2, y1), (name, world)


@pytest.mark.parametrize("world", [1, 2])
def test_an_epoch_resumes_at_any_step_without_replaying(world):
    stream = _loaders(world - 1, world, 1, batch=8).streams[0]
    whole = _epoch(stream, 3)
    for start in (1, 5, len(stream) - 1, len(stream)):
        assert _bitwise(_epoch(stream, 3, start), whole[start:]), start
    with pytest.raises(BipError, match="cannot start an epoch at step"):
        next(stream.epoch(3, start=len(stream) + 1))


def test_streams_share_one_upload_of_the_split():
    loaders = _loaders()
    a, b = loaders.streams
    assert a.data is b.data and a.data.images.data_ptr() == b.data.images.data_ptr()
    assert a.data.images.shape[0] == 200   # train + held-out val, once (val reads it too)


def test_crops_and_flips_are_the_plans():
    from bip.data.tensor_loader import DeviceImages, TensorStream
    spec = load_dataset(data_cfg("data.dataset=synthetic", "data.synthetic_size=64"))
    data = DeviceImages(spec.train, spec, False, torch.device("cpu"))
    stream = TensorStream(data, torch.arange(64), 16, True, 0, 0, 0, 1)
    plan = stream.plan(2)
    x = torch.cat([x for x, _ in stream.epoch(2)])
    padded = torch.nn.functional.pad(spec.train.images, (4, 4, 4, 4))
    for i, (idx, dy, dx, flip) in enumerate(plan.T.tolist()):
        want = padded[idx, :, dy:dy + 32, dx:dx + 32]
        assert torch.equal(x[i], (want.flip(-1) if flip else want).float() / 255)  # not normalised
    assert 0 < plan[3].sum() < 64 and len(set(plan[1].tolist())) > 3  # the draws vary


def test_augmentation_keeps_shape_and_pads_black():
    from bip.data.tensor_loader import DeviceImages, TensorStream
    split = ArraySplit(torch.full((8, 3, 8, 8), 255, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64))
    spec = load_dataset(data_cfg("data.dataset=synthetic", "data.synthetic_size=16"))
    stream = TensorStream(DeviceImages(split, spec, False, torch.device("cpu")), torch.arange(8), 8,
                          True, 0, 0, 0, 1)
    x, _ = next(iter(stream.epoch(0)))
    assert x.shape == (8, 3, 8, 8)
    assert set(x.unique().tolist()) <= {0.0, 1.0} and (x == 0).any()  # padding is black


def test_imagenet_lmdb_of_the_seed_format(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    import io
    for split in ("train", "val"):
        env = lmdb.open(str(tmp_path / f"{split}.lmdb"), map_size=1 << 24)
        keys = []
        with env.begin(write=True) as txn:
            for i in range(4):
                buf = io.BytesIO()
                Image.fromarray(np.full((40, 40, 3), 60 * i, dtype=np.uint8)).save(buf, format="JPEG")
                key = f"{i:08d}".encode()
                txn.put(key, pickle.dumps((buf.getvalue(), i % 2)))
                keys.append(key)
            txn.put(b"__keys__", pickle.dumps(keys))
            txn.put(b"__len__", pickle.dumps(len(keys)))
        env.close()
    spec = load_dataset(data_cfg("data.dataset=ImageNet", f"data.data_dir={tmp_path}"))
    image, label = spec.train[3]
    assert len(spec.train) == 4 and label == 1 and image.size == (40, 40)
    assert abs(np.asarray(image).mean() - 180) < 3


def test_torch_loader_global_batch_and_resume_whatever_worker_loads_a_sample():
    # One process reading in itself (no workers) vs two ranks each with a worker process: the
    # same global batches, pixel for pixel (crops and flips seeded per item, not per worker).
    one = _loaders(0, 1, 1, "data.num_workers=0", batch=8, loader="torch")
    ranks = [_loaders(r, 2, 1, "data.num_workers=1", batch=4, loader="torch") for r in range(2)]
    rng = torch.get_rng_state()
    whole = _epoch(one.streams[0], 1)
    assert torch.equal(rng, torch.get_rng_state())  # no workers: the global generator is restored
    shards = [_epoch(r.streams[0], 1) for r in ranks]
    assert len(whole) == 180 // 8 and _bitwise(_gathered(shards), whole)
    assert _bitwise(_epoch(ranks[1].streams[0], 1, start=7), shards[1][7:])   # resumed mid-epoch
    abandoned = ranks[0].streams[0].epoch(1)   # (train.steps_per_epoch stops an epoch early)
    next(abandoned), next(abandoned)
    assert _bitwise(_epoch(ranks[0].streams[0], 1), shards[0])   # the persistent workers restart
    assert not _bitwise(_epoch(one.streams[0], 2), whole)


class _PidImages(torch.utils.data.Dataset):
    """Images labelled with the id of the process that reads them."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)), os.getpid()


def test_torch_workers_persist_and_bip_streams_share_the_cpus(monkeypatch):
    from bip.data.base import DatasetSpec
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")   # budget: min(data.num_workers, 4) = 2
    cfg = data_cfg("data.dataset=ImageNet", "data.loader=torch", "data.num_workers=2",
                   "data.batch_size=4", "data.val_fraction=0.25")
    spec = DatasetSpec(2, _PidImages(), _PidImages(), (0.5,) * 3, (0.25,) * 3, "small", 8)
    loaders = build_loaders(cfg, spec, seed=0, streams=2, rank=0, world=1, device=torch.device("cpu"))
    assert [s.loader.num_workers for s in loaders.streams] == [1, 1]   # BiP: 2 CPUs, 1 each

    def pids(batches):
        return {int(p) for _, y in batches for p in y}
    first = [pids(s.epoch(0)) for s in loaders.streams]
    assert first == [pids(s.epoch(1)) for s in loaders.streams]   # the same worker, every epoch
    assert len(first[0]) == 1 and first[0] != first[1] and os.getpid() not in first[0] | first[1]
    evals = pids(loaders.val()) | pids(loaders.test())
    assert evals == pids(loaders.val()) | pids(loaders.test()) and os.getpid() not in evals


def test_worker_budget():
    from bip.data.plan import cpu_budget, split_workers
    assert split_workers(5, 2) == [3, 2] and split_workers(1, 2) == [1, 0] and split_workers(4, 1) == [4]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CPUS_PER_TASK", "3")
        assert cpu_budget(8) == 3 and cpu_budget(2) == 2 and cpu_budget(0) == 0


class _HostToDevice(SyncRecorder):
    """Also records every copy from the host to another device: on a GPU a copy from pageable
    memory makes the host wait, and any per-step copy is per-step host work the device waits on."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.copy_):
            src = args[1] if func.overloadpacket is torch.ops.aten.copy_ else args[0]
            dst = args[0].device if func.overloadpacket is torch.ops.aten.copy_ else kwargs.get("device")
            if src.device.type == "cpu" and dst is not None and torch.device(dst).type != "cpu":
                self._record(f"{func} (host -> device copy)")
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_drawing_batches_never_waits_for_the_host():
    # An epoch's start and four steps of both streams (the per-epoch plan included): no op that
    # would make the host wait for a GPU.
    loaders = _loaders()
    with SyncRecorder() as rec:
        for stream in loaders.streams:
            batches = stream.epoch(0)
            for _ in range(5):
                next(batches)
    assert rec.events == [], rec.summary()
    # On the meta device (an accelerator stand-in, so copies from the host show on a CPU-only
    # machine): one copy per epoch (the plan), none per step.
    stream = _loaders(device="meta").streams[0]
    with _HostToDevice() as setup:
        batches = stream.epoch(0)
        x, y = next(batches)
    with _HostToDevice() as steps:
        for _ in range(4):
            x, y = next(batches)
    assert len(setup.events) == 1 and steps.events == [], (setup.summary(), steps.summary())
    assert x.device.type == "meta" and x.shape == (16, 3, 32, 32) and x.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensor_loader_on_cuda_never_syncs_and_matches_cpu():
    cpu, gpu = _loaders(), _loaders(device="cuda")
    expected = _epoch(cpu.streams[1], 2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _epoch(gpu.streams[1], 2)   # the epoch's plan, its copy and every step
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert _bitwise([(x.cpu(), y.cpu()) for x, y in got], expected)


class _RunsCode:
    def __reduce__(self):
        return (print, ("a crafted pickle ran code",))


def test_imagenet_lmdb_refuses_pickles_that_name_python_objects(tmp_path, capsys):
    """A crafted LMDB record (a pickle that calls print) is refused, in one line that says LMDB
    input must be trusted and names the pickle-free route; nothing is called."""
    lmdb = pytest.importorskip("lmdb")

    def write(folder, keys, record):
        folder.mkdir()
        for split in ("train", "val"):
            env = lmdb.open(str(folder / f"{split}.lmdb"), map_size=1 << 24)
            with env.begin(write=True) as txn:
                txn.put(b"0", pickle.dumps(record))
                txn.put(b"__keys__", pickle.dumps(keys))
            env.close()
        return data_cfg("data.dataset=ImageNet", f"data.data_dir={folder}")
    spec = load_dataset(write(tmp_path / "a", [b"0"], (b"not a jpeg", _RunsCode())))
    with pytest.raises(BipError, match=r"record b'0' is not plain pickled data .*refused to load "
                                       r"the Python object builtins.print.*must come from a source you "
                                       r"trust.*python -m bip.data.ffcv write"):
        spec.train[0]
    with pytest.raises(BipError, match="__keys__ is not plain pickled data"):
        load_dataset(write(tmp_path / "b", _RunsCode(), (b"", 0)))
    assert "ran code" not in capsys.readouterr().out
