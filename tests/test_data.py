"""Dataset readers (on files the tests write) and the reproducible, sharded loaders."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from bip.config import load_config
from bip.data import ArraySplit, load_dataset
from bip.data.loaders import build_loaders, split_indices
from bip.errors import BipError


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


def _loaders(rank=0, world=1, streams=2):
    cfg = data_cfg("data.dataset=synthetic", "data.synthetic_size=200", "data.batch_size=16")
    spec = load_dataset(cfg)
    return build_loaders(cfg, spec, seed=3, streams=streams, rank=rank, world=world,
                         device=torch.device("cpu"))


def test_epochs_are_reproducible_and_streams_differ():
    a, b = _loaders(), _loaders()
    xa, _ = next(iter(a.streams[0].epoch(4)))
    xb, _ = next(iter(b.streams[0].epoch(4)))
    assert torch.equal(xa, xb)                                  # same (seed, stream, epoch)
    assert not torch.equal(xa, next(iter(a.streams[1].epoch(4)))[0])   # BiP's second stream
    assert not torch.equal(xa, next(iter(a.streams[0].epoch(5)))[0])   # next epoch


def test_ranks_get_disjoint_equal_shards():
    from bip.data.loaders import _Normalize, TensorStream
    n = 101  # image i has every pixel = i, so a batch tells which samples it holds
    split = ArraySplit(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).clone(),
                       torch.zeros(n, dtype=torch.int64))
    spec = load_dataset(data_cfg("data.dataset=synthetic", "data.synthetic_size=16"))
    norm = _Normalize(spec, False, torch.device("cpu"))
    seen = []
    for rank in (0, 1):
        stream = TensorStream(split, 10, False, norm, 3, 0, rank, 2, torch.device("cpu"))
        ids = [int(round(v * 255)) for x, _ in stream.epoch(0) for v in x[:, 0, 0, 0].tolist()]
        assert len(stream) == 5 and len(ids) == 50
        seen.append(set(ids))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 100  # one sample left over
    evals = [sum(len(y) for _, y in _loaders(r, 2, 1).test()) for r in (0, 1)]
    assert sum(evals) == len(load_dataset(data_cfg("data.dataset=synthetic", "data.synthetic_size=200")).test)


def test_augmentation_keeps_shape_and_pads_black():
    from bip.data.loaders import _Normalize, TensorStream
    split = ArraySplit(torch.full((8, 3, 8, 8), 255, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64))
    spec = load_dataset(data_cfg("data.dataset=synthetic", "data.synthetic_size=16"))
    stream = TensorStream(split, 8, True, _Normalize(spec, False, torch.device("cpu")), 0, 0, 0, 1,
                          torch.device("cpu"))
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
