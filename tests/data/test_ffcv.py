"""The ffcv data path on CPU: .beton writing (round trip, atomicity), the loaders' contract
(held-out split, reproducible and distinct streams, DDP shards) and training runs on it.

The data is a tiny JPEG ImageFolder written here. Each ffcv Loader compiles its pipeline with
numba on first use (seconds each), so the files and loaders are shared where possible.
"""
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")
pytestmark = pytest.mark.ffcv

from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.pipeline.operation import Operation  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from bip.config import load_config  # noqa: E402
from bip.data.base import IMAGENET_MEAN, IMAGENET_STD, ArraySplit, DatasetSpec  # noqa: E402
from bip.data import load_dataset
from bip.data.ffcv.__main__ import main  # noqa: E402
from bip.data.ffcv.loader import FfcvStream, build_ffcv_loaders, check_beton  # noqa: E402
from bip.data.ffcv.ops import FullDecoder  # noqa: E402
from bip.data.ffcv.write import _ArrayItems, _interrupt, source_split, write_beton  # noqa: E402
from bip.data.loaders import build_loaders  # noqa: E402
from bip.data.base import split_indices
from bip.errors import BipError  # noqa: E402

CPU = torch.device("cpu")


def make_image_folder(root: Path, classes: int = 3, per_class=(10, 4), size=(48, 40)) -> Path:
    """train/ and val/ class folders of smooth random JPEGs (compressible, like photos)."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
                coarse.resize(size, Image.BILINEAR).save(folder / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffcv")
    folder = make_image_folder(root / "imagenet")
    out = SimpleNamespace(folder=folder, train=root / "train.beton", val=root / "val.beton",
                          train_jpg=root / "train_jpg.beton")
    for split, path, fraction in (("train", out.train, 0.0), ("val", out.val, 0.0),
                                  ("train", out.train_jpg, 1.0)):
        items, _ = source_split("ImageNet", split, str(folder))
        write_beton(items, path, jpeg_fraction=fraction, quality=90, workers=2, progress=False)
    return out


def imagenet_cfg(data, *extra):
    return load_config([], ["data.dataset=ImageNet", f"data.data_dir={data.folder}",
                            "data.loader=ffcv", f"data.train_beton={data.train}",
                            f"data.val_beton={data.val}", "data.image_size=32",
                            "data.batch_size=8", "data.num_workers=1", *extra])


def read_back(path, decoder):
    loader = Loader(str(path), batch_size=64, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [decoder], "label": [IntDecoder()]})
    images, labels = zip(*[(x.copy(), y[:, 0].copy()) for x, y in loader])
    return np.concatenate(images), np.concatenate(labels)


def test_written_files_hold_the_folder(data):
    folder = ImageFolder(str(data.folder / "train"))
    originals = np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in folder.samples])
    # Raw pixels through ffcv's own decoder, JPEGs through ours.
    for path, decoder, tolerance in ((data.train, SimpleRGBImageDecoder(), 0.0),
                                     (data.train_jpg, FullDecoder(), 3.0)):
        images, labels = read_back(path, decoder)
        assert len(images) == len(folder) == 30
        assert labels.tolist() == folder.targets
        error = np.abs(images.astype(np.int16) - originals).mean()
        assert error <= tolerance, (path.name, error)  # raw: exact; JPEG q90: within tolerance
    assert os.stat(data.train).st_mode & 0o044  # readable by others, as a dataset should be


def test_writer_command_errors_are_one_line(tmp_path, capsys):
    base = ["write", "--split", "train", "--out", str(tmp_path / "x.beton")]
    cases = [["--dataset", "ImageNet", "--data-dir", str(tmp_path / "missing")],
             ["--dataset", "NoSuchSet", "--data-dir", str(tmp_path)],
             ["--dataset", "ImageNet", "--data-dir", str(tmp_path), "--split", "dev"]]
    for args in cases:
        assert main(base + args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


class _Items(torch.utils.data.Dataset):
    """n images labelled 0..n-1; optionally slow, or failing at one index."""

    def __init__(self, n, size=16, delay=0.0, fail_at=-1):
        self.n, self.size, self.delay, self.fail_at = n, size, delay, fail_at

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.delay)
        if i == self.fail_at:
            raise OSError(f"image {i} is corrupt")
        return np.full((self.size, self.size, 3), i % 256, dtype=np.uint8), i


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(BipError, match="writer process exited"):
        write_beton(_Items(50, fail_at=20), tmp_path / "x.beton", workers=1, chunk_size=5,
                    progress=False)
    assert list(tmp_path.iterdir()) == []


def _write_slowly(out):
    os.setsid()  # its own process group, so the test can kill the writer's workers with it
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        write_beton(_Items(200, delay=0.02), out, workers=1, chunk_size=5, progress=False)
    except KeyboardInterrupt:
        os._exit(130)
    os._exit(0)


def _start_writer(out):
    proc = multiprocessing.get_context("fork").Process(target=_write_slowly, args=(out,))
    proc.start()
    deadline = time.time() + 60
    while not list(out.parent.glob(f".{out.name}.tmp-*")):
        assert time.time() < deadline and proc.is_alive()
        time.sleep(0.05)
    time.sleep(0.5)  # well into the write (200 images x 20 ms)
    return proc


def test_interrupted_write_never_leaves_a_loadable_beton(tmp_path):
    out = tmp_path / "terminated.beton"
    proc = _start_writer(out)
    os.kill(proc.pid, signal.SIGTERM)  # as Slurm at the time limit, or Ctrl-C
    proc.join(30)
    assert proc.exitcode == 130 and list(tmp_path.iterdir()) == []

    out = tmp_path / "killed.beton"
    proc = _start_writer(out)
    os.killpg(proc.pid, signal.SIGKILL)  # no cleanup possible: the half file keeps its temp name
    proc.join(30)
    assert not out.exists()
    (leftover,) = tmp_path.glob(".killed.beton.tmp-*")
    shutil.copy(leftover, tmp_path / "renamed.beton")
    with pytest.raises(BipError, match="not a complete .beton"):
        check_beton(str(tmp_path / "renamed.beton"), "data.train_beton")

    complete = write_beton(_Items(40), tmp_path / "complete.beton", workers=1, progress=False)
    check_beton(str(complete), "data.train_beton")
    with open(complete, "r+b") as f:  # e.g. a copy cut short
        f.truncate(complete.stat().st_size - 8)
    with pytest.raises(BipError, match="not a complete .beton"):
        check_beton(str(complete), "data.train_beton")


def _batches(stream, epoch, start=0):
    return [(x.clone(), y.clone()) for x, y in stream.epoch(epoch, start=start)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2)
                                    for (x1, y1), (x2, y2) in zip(a, b))


def test_imagenet_loaders_contract(data):
    # Progressive resizing 16 -> 32 px over epochs 0 -> 1; evaluation at 32 px. The training
    # file stores JPEGs, the evaluation file raw pixels: both decoding paths.
    cfg = imagenet_cfg(data, "data.min_res=16", "data.end_ramp=1", "data.normalize=true",
                       f"data.train_beton={data.train_jpg}").data
    spec = load_dataset(cfg)
    torch_threads = torch.get_num_threads()
    loaders = build_ffcv_loaders(cfg, spec, seed=3, streams=2, rank=0, world=1, device=CPU)
    train_idx, val_idx = split_indices(30, cfg.val_fraction, cfg.split_seed)
    assert len(loaders.streams[0]) == len(train_idx) // 8 and loaders.input_shape == (3, 32, 32)
    assert (loaders.val_size, loaders.test_size) == (len(val_idx), 12)
    targets = torch.tensor(spec.train.targets)
    assert torch.cat([y for _, y in loaders.val()]).tolist() == targets[val_idx].tolist()
    assert torch.cat([y for _, y in loaders.test()]).tolist() == spec.test.targets
    x, _ = next(iter(loaders.test()))
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.float32 and -3 < x.mean() < 3

    e0, e1 = _batches(loaders.streams[0], 0), _batches(loaders.streams[0], 1)
    assert [tuple(x.shape) for x, _ in e0] == [(8, 3, 16, 16)] * 3
    assert [tuple(x.shape) for x, _ in e1] == [(8, 3, 32, 32)] * 3
    assert _same(e0, _batches(loaders.streams[0], 0))           # an epoch is a pure function
    assert not _same(e0, _batches(loaders.streams[1], 0))       # of (seed, stream, epoch)
    # A fresh loader (a resumed run) decoding with two threads draws the same crops and flips.
    again = build_ffcv_loaders(replace(cfg, num_workers=2), spec, seed=3, streams=1, rank=0,
                               world=1, device=CPU)
    assert _same(e1, _batches(again.streams[0], 1))
    assert torch.get_num_threads() == torch_threads  # ffcv sets it to data.num_workers


def test_progressive_resolution_schedule():
    cfg = SimpleNamespace(min_res=160, start_ramp=10, end_ramp=20)
    res = [FfcvStream.resolution(SimpleNamespace(cfg=cfg, size=224), e) for e in range(25)]
    assert res[:11] == [160] * 11 and res[20:] == [224] * 5
    assert res == sorted(res) and all(r % 32 == 0 for r in res)


def test_small_pipeline_matches_the_tensor_loader(tmp_path):
    cfg = load_config([], ["data.dataset=synthetic", "data.synthetic_size=64", "data.loader=ffcv",
                           f"data.train_beton={tmp_path / 'train.beton'}", "data.normalize=true",
                           f"data.val_beton={tmp_path / 'test.beton'}", "data.num_workers=1",
                           "data.batch_size=16", "data.test_batch_size=7"]).data
    spec = load_dataset(cfg)
    for split, name in ((spec.train, "train.beton"), (spec.test, "test.beton")):
        write_beton(_ArrayItems(split), tmp_path / name, workers=1, progress=False)
    ffcv = build_ffcv_loaders(cfg, spec, seed=0, streams=1, rank=0, world=1, device=CPU)
    tensor = build_loaders(replace(cfg, loader="tensor"), spec, seed=0, streams=1, rank=0,
                           world=1, device=CPU)
    assert spec.style == "small" and ffcv.input_shape == tensor.input_shape == (3, 32, 32)
    for name in ("val", "test"):  # no augmentation: the same tensors up to float rounding
        a, b = getattr(ffcv, name)(), getattr(tensor, name)()
        xa, ya = map(torch.cat, zip(*a))
        xb, yb = map(torch.cat, zip(*b))
        assert torch.equal(ya, yb) and torch.allclose(xa, xb, atol=1e-5)
    x, y = next(ffcv.streams[0].epoch(0))
    assert x.shape == (16, 3, 32, 32) and len(ffcv.streams[0]) == len(tensor.streams[0])
    # Each training image is a training image shifted by up to 4 px (black fill), maybe flipped.
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (spec.mean, spec.std))
    pixels = (x * std + mean).round().to(torch.uint8)
    padded = torch.nn.functional.pad(spec.train.images, (4, 4, 4, 4))
    shifts = torch.stack([padded[..., dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)], 1)
    candidates = torch.cat([shifts, shifts.flip(-1)], 1).flatten(0, 1)
    for image, label in zip(pixels, y):
        match = (candidates == image).flatten(1).all(1).view(len(padded), -1).any(1)
        assert match.any() and (spec.train.labels[match] == label).all()


def _id_spec(train_path, test_path):
    """A 40 + 13 image set whose labels are the image ids, so coverage can be read off."""
    cfg = load_config([], ["data.dataset=synthetic", "data.loader=ffcv", "data.val_fraction=0.2",
                           f"data.train_beton={train_path}", f"data.val_beton={test_path}",
                           "data.batch_size=4", "data.test_batch_size=3", "data.num_workers=1"]).data
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g)
    train = ArraySplit(images, torch.arange(40))
    test = ArraySplit(torch.zeros(13, 3, 16, 16, dtype=torch.uint8), torch.arange(13))
    return cfg, DatasetSpec(40, train, test, IMAGENET_MEAN, IMAGENET_STD, "imagenet", 16)


def _gathered(shards):
    """Global batches from the ranks' batches (rank r holds the r-th interleaved shard)."""
    return [(torch.stack(xs, 1).flatten(0, 1), torch.stack(ys, 1).flatten(0, 1))
            for xs, ys in (zip(*step) for step in zip(*shards))]


def test_any_world_size_reads_the_same_global_batches_and_resumes_at_any_step(tmp_path):
    # Ranks are built directly (rank, world): the order needs no process group. Random-resized
    # crops and flips of random images, so equal batches mean equal draws.
    paths = (str(tmp_path / "train.beton"), str(tmp_path / "test.beton"))
    cfg, spec = _id_spec(*paths)
    for split, path in ((spec.train, paths[0]), (spec.test, paths[1])):
        write_beton(_ArrayItems(split), path, workers=1, progress=False)
    ranks = [build_ffcv_loaders(cfg, spec, seed=5, streams=1, rank=r, world=2, device=CPU)
             for r in range(2)]
    one = build_ffcv_loaders(replace(cfg, batch_size=8), spec, seed=5, streams=1,
                             rank=0, world=1, device=CPU).streams[0]
    train_idx, val_idx = split_indices(40, 0.2, 0)
    assert len(ranks[0].streams[0]) == len(ranks[1].streams[0]) == 32 // (4 * 2)
    for epoch in (0, 1):
        shards = [_batches(r.streams[0], epoch) for r in ranks]
        ids = sorted(i for shard in shards for _, y in shard for i in y.tolist())
        assert ids == train_idx.tolist(), epoch  # each training image once per epoch
        assert _same(_gathered(shards), _batches(one, epoch)), epoch
        assert _same(_batches(ranks[1].streams[0], epoch, start=3), shards[1][3:])
    assert not _same(shards[0], _batches(ranks[0].streams[0], 0))
    assert list(ranks[0].streams[0].epoch(1, start=len(ranks[0].streams[0]))) == []
    assert sorted(torch.cat([y for r in ranks for _, y in r.val()]).tolist()) == val_idx.tolist()
    assert sorted(torch.cat([y for r in ranks for _, y in r.test()]).tolist()) == list(range(13))


def test_pretrain_and_bip_prune_epochs_run_on_ffcv(data, tmp_path):
    from bip.train import train
    common = ["model.arch=resnet20s", "train.epochs=1", "optim.lr=0.01"]
    pre = train(imagenet_cfg(data, *common, "run.stage=pretrain"), tmp_path / "pretrain")
    assert pre["epochs"] == 1 and 0 <= pre["test_acc"] <= 100
    # BiP reads two streams at once, here each decoded by two threads. The .beton files are all
    # it needs: no raw image folder on the node.
    cfg = imagenet_cfg(data, *common, "data.num_workers=2", "data.data_dir=/nonexistent-raw-images",
                       "run.stage=prune",
                       "prune.layer_type=unstructured", "prune.k=0.5", "prune.method=bip",
                       f"run.source_net={tmp_path / 'pretrain' / 'checkpoint.pt'}")
    result = train(cfg, tmp_path / "prune")
    assert result["epochs"] == 1 and result["method"] == "bip"
    assert abs(result["sparsity"]["kept_fraction"] - 0.5) < 0.01
    lines = (tmp_path / "prune" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 3


def test_without_ffcv_the_error_is_one_line(data, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ffcv", None)  # as if not installed
    cfg = imagenet_cfg(data).data
    with pytest.raises(BipError) as err:
        build_loaders(cfg, load_dataset(cfg), seed=0, streams=1, rank=0, world=1, device=CPU)
    assert "pip install -e '.[ffcv]'" in str(err.value) and "\n" not in str(err.value)
    assert main(["write", "--dataset", "ImageNet", "--split", "train", "--data-dir", "x",
                 "--out", "y"]) == 2
    assert "pip install -e '.[ffcv]'" in capsys.readouterr().err


class _Boom(Operation):
    """A pipeline stage that fails, as a bug in an operation would."""

    def generate_code(self):
        def boom(labels, _):
            raise RuntimeError("boom")
        return boom

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=False), None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_pipeline_error_raises_instead_of_hanging(data):
    from bip.data.ffcv.loader import _iterate
    loader = Loader(str(data.val), batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": None, "label": [IntDecoder(), _Boom()]})
    with pytest.raises(BipError, match="thread stopped"):
        list(_iterate(loader))
