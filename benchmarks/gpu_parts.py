"""The parts of benchmarks/gpu_check.py; each returns table rows and runs in its own process.

A row is {"part", "check", "result", "goal", "ok"}: ok is True / False when a goal applies
to this device, None when it does not (a CPU, or a GPU that is not H100/H200-class for the
epoch-time goal). Sizes come from ``Sizes``: the real ones on a GPU, tiny ones with --quick
(the CPU test proves every part runs end to end; its figures mean nothing).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import step_cost
from bip.pruning import masking
from bip.config import load_config
from bip.data.base import ArraySplit, DatasetSpec
from bip.data import load_dataset
from bip.data.loaders import build_loaders
from bip.methods.registry import create_method
from bip.models import create_model
from bip.train.nonfinite import NonFiniteGuard
from bip.train.compile import to_channels_last
from bip.testing.synccheck import SyncRecorder

ROOT = Path(__file__).resolve().parent.parent
LAYER_TYPES = ("unstructured", "filter", "channel", "nm")
STEPPED = ("finetune", "hydra", "bip", "bip-reference")


@dataclass(frozen=True)
class Sizes:
    arch: str = "resnet18"
    batch: int = 128
    image: int = 32
    steps: int = 20          # timed rounds of step_cost
    warmup: int = 3
    cifar_images: int = 50_000   # 45,000 train after the 10% validation split
    imagenet_arch: str = "resnet50"
    imagenet_image: int = 224
    imagenet_images: int = 5120   # 4,608 train: 36 steps of 128
    imagenet_steps: int = 30
    imagenet_batch: int = 128
    compile_backend: str = "inductor"
    compile_methods: tuple = ("dense", "hydra", "bip")


QUICK = Sizes(arch="resnet20s", batch=8, image=16, steps=2, warmup=1, cifar_images=160,
              imagenet_image=32, imagenet_images=8, imagenet_steps=1, imagenet_batch=2,
              compile_backend="eager", compile_methods=("dense", "hydra"))


SINK: Path | None = None  # rows are written here as soon as they are made (a part that
_MADE: list[dict] = []    # times out later keeps what it measured)


def row(part, check, result, goal="", ok=None) -> dict:
    r = {"part": part, "check": check, "result": result, "goal": goal, "ok": ok}
    _MADE.append(r)
    if SINK is not None:
        tmp = SINK.with_suffix(".tmp")
        tmp.write_text(json.dumps(_MADE))
        os.replace(tmp, SINK)
    return r


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- host syncs -------------------------------------------------------------------------------

class SyncCount:
    """Host syncs in a block: CUDA's own sync debug mode ("warn", counted: "error" would stop
    at the first) on a GPU, bip.testing.synccheck's dispatch-mode recorder on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda, self.n, self.what = device.type == "cuda", 0, []

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self._caught = warnings.catch_warnings(record=True)
            self._log = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self._rec = SyncRecorder(stack=False).__enter__()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(*exc)
            hits = [str(w.message) for w in self._log if "synchroniz" in str(w.message)]
        else:
            self._rec.__exit__(*exc)
            hits = [op for op, _ in self._rec.events]
        self.n += len(hits)
        self.what += hits[:3]
        return False


def cfg_for(method: str, layer_type: str, extra=()):
    if method == "dense":
        return load_config([], ["run.stage=pretrain", "train.epochs=2", *extra])
    k = [] if layer_type == "nm" else ["prune.k=0.1"]
    if method == "finetune":
        return load_config([], ["run.stage=finetune", f"prune.layer_type={layer_type}", "train.epochs=2", *k, *extra])
    name, _, variant = method.partition("-")
    return load_config([], ["run.stage=prune", f"prune.layer_type={layer_type}", f"prune.method={name}",
                            f"bip.variant={variant or 'paper'}", "prune.score_init=magnitude",
                            "train.epochs=2", *k, *extra])


def synthetic_loaders(device, images: int, batch: int, streams: int = 2, size: int = 32):
    data = load_config([], ["data.dataset=synthetic", f"data.synthetic_size={images}",
                            f"data.batch_size={batch}", "data.normalize=true"]).data
    spec = load_dataset(data)
    if size != 32:  # ImageNet-shaped: random pixels (content does not change a step's cost)
        g = torch.Generator().manual_seed(0)
        split = ArraySplit(torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=g),
                           torch.randint(0, 100, (images,), generator=g))
        spec = DatasetSpec(100, split, split, spec.mean, spec.std, image_size=size)
    return build_loaders(data, spec, seed=0, streams=streams, rank=0, world=1, device=device)


def syncs(device: torch.device, s: Sizes) -> list[dict]:
    """One warm-up step, then 3 steps of every method and layer type as the loop runs them
    (next batch from the tensor loader, non-finite guard, step), syncs counted."""
    loaders = synthetic_loaders(device, 4 * s.batch * 4, s.batch)
    rows = []
    count = SyncCount(device)
    with count:
        batches = loaders.streams[0].epoch(0)
        for _ in range(3):
            next(batches)
    rows.append(row("syncs", "tensor loader, first 3 batches of an epoch (its plan upload included)",
                    f"{count.n} syncs", "0", count.n == 0))
    cases = [("dense", ("dense",))] + [(m, LAYER_TYPES) for m in STEPPED]
    for method, types in cases:
        per_type = []
        for layer_type in types:
            torch.manual_seed(0)
            model = create_model(s.arch, 10, layer_type).to(device)
            m = create_method(cfg_for(method, layer_type), model)
            m.on_epoch_start(0)
            guard = NonFiniteGuard(model, m.optimizers.values(), 0, device)
            streams = [st.epoch(0) for st in loaders.streams[:m.streams]]
            m.step([next(b) for b in streams], 0.0)  # warm-up (allocations, cuDNN choices)
            count = SyncCount(device)
            with count:
                for i in range(3):
                    guard.before_step()
                    stats = m.step([next(b) for b in streams], 0.1 * i)
                    guard.after_step(stats["loss"], i)
            per_type.append((layer_type, count.n / 3, count.what))
        result = ", ".join(f"{t} {n:g}" for t, n, _ in per_type)
        first = next((w for _, n, w in per_type if n), [])
        rows.append(row("syncs", f"{method}: syncs per step", result + (f" (first: {first[0][:80]})" if first else ""),
                        "0", all(n == 0 for _, n, _ in per_type)))
    return rows


# -- GPU tests --------------------------------------------------------------------------------

def gpu_tests(device: torch.device, s: Sizes, timeout: float) -> list[dict]:
    """pytest -m gpu over the test files that hold GPU tests and import without submitit/ffcv."""
    files, skipped = [], []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        text = path.read_text()
        if "mark.gpu" not in text:
            continue
        needs = [mod for mod in ("submitit", "ffcv") if re.search(rf"^(import|from) {mod}\b", text, re.M)
                 and importlib.util.find_spec(mod) is None]
        (skipped.append(f"{path.name} (needs {', '.join(needs)})") if needs else files.append(str(path)))
    rows = [row("tests", "GPU test files skipped", "; ".join(skipped))] if skipped else []
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-6000:], proc.stderr[-2000:], flush=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-200:]
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", summary))
    bad = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    ran = counts.get("passed", 0) + bad
    rows.append(row("tests", f"pytest -m gpu ({len(files)} files)", summary.strip("= "),
                    "all pass", (bad == 0 and proc.returncode in (0, 5)) if ran or device.type == "cuda" else None))
    return rows


# -- step cost --------------------------------------------------------------------------------

def step_cost_rows(device, s: Sizes, precision: str, channels_last: bool, compiled: bool,
                   methods=("dense", "hydra", "bip", "bip-reference")) -> list[dict]:
    argv = ["--arch", s.arch, "--batch-size", str(s.batch), "--image-size", str(s.image),
            "--steps", str(s.steps), "--warmup", str(s.warmup), "--device", device.type,
            "--precision", precision, "--methods", *methods]
    argv += ["--channels-last"] if channels_last else []
    argv += ["--compile", "--compile-backend", s.compile_backend] if compiled else []
    r = step_cost.measure(step_cost.parser().parse_args(argv))
    print(step_cost.report(r), flush=True)
    what = ", ".join([precision] + (["channels_last"] if channels_last else []) +
                     ([f"compiled ({s.compile_backend})"] if compiled else []))
    part = "compile" if compiled else "step_cost"
    x = r["x_dense"]
    goal_ok = x.get("hydra", 0) <= 1.1 and x.get("bip", 0) <= 2.1
    result = f"dense {r['ms']['dense']:.1f} ms; " + "; ".join(f"{n} {x[n]:.2f}x" for n in methods if n != "dense")
    rows = [row(part, f"{s.arch} batch {s.batch}, {what}: step time vs dense", result,
                "hydra <= 1.1x, bip <= 2.1x", goal_ok if device.type == "cuda" else None),
            row(part, f"mask update ({what})", f"{r['ms']['mask update']:.2f} ms = "
                f"{r['mask_update_pct_of_hydra']:.1f}% of a hydra step", "<= 2%",
                r["mask_update_pct_of_hydra"] <= 2 if device.type == "cuda" else None)]
    if compiled:
        rows.append(row(part, f"graphs compiled ({what})", f"{r['graphs_warmup']} in warm-up "
                        f"({r['warmup_s']:.0f} s), {r['graphs_after_warmup']} after", "0 after",
                        r["graphs_after_warmup"] == 0))
    return rows


# -- epochs -----------------------------------------------------------------------------------

def timed_bip_epoch(device, s: Sizes, precision: str, channels_last: bool, arch: str, loaders,
                    steps: int | None = None, warm: int = 10, method: str = "bip"):
    """(seconds, steps) of one BiP epoch (or ``steps`` of it) after ``warm`` untimed steps."""
    torch.manual_seed(0)
    model = create_model(arch, loaders.num_classes, "dense" if method == "dense" else "unstructured").to(device)
    if channels_last:
        to_channels_last(model)
    m = create_method(cfg_for(method, "unstructured", [f"train.mixed_precision={precision}"]), model)
    n = len(loaders.streams[0]) if steps is None else min(steps, len(loaders.streams[0]))
    warm_batches = zip(*(st.epoch(0) for st in loaders.streams[:m.streams]))
    for _, batch in zip(range(warm), warm_batches):
        m.step(list(batch), 0.0)
    sync(device)
    start = time.perf_counter()
    for _, batch in zip(range(n), zip(*(st.epoch(1) for st in loaders.streams[:m.streams]))):
        m.step(list(batch), 0.5)
    sync(device)
    return time.perf_counter() - start, n


def cifar_epoch(device, s: Sizes) -> list[dict]:
    loaders = synthetic_loaders(device, s.cifar_images, s.batch)
    train = len(loaders.streams[0]) * s.batch
    fast = "H100" in _name(device) or "H200" in _name(device)
    rows = []
    for precision, cl in (("bf16", False), ("bf16", True), ("fp32", False)):
        secs, n = timed_bip_epoch(device, s, precision, cl, s.arch, loaders, warm=3 * s.warmup)
        what = precision + (", channels_last" if cl else "")
        rows.append(row("cifar_epoch", f"BiP epoch, {s.arch}, {n} steps x {s.batch} ({train} images, "
                        f"tensor loader), {what}", f"{secs:.1f} s, {n * s.batch / secs:,.0f} images/s",
                        "<= 10 s (H100/H200, bf16)", secs <= 10 if fast and precision == "bf16" else None))
    return rows


def imagenet_slice(device, s: Sizes, quick: bool) -> list[dict]:
    use_ffcv = importlib.util.find_spec("ffcv") is not None and not quick
    rows = [row("imagenet", "input pipeline", "ffcv (.beton of synthetic JPEGs)" if use_ffcv else
                f"ffcv not importable (or --quick): synthetic {s.imagenet_image} px uint8 images on the "
                "device through the tensor loader (pad-crop + flip); no JPEG decoding is measured")]
    loaders = ffcv_loaders(device, s) if use_ffcv else synthetic_loaders(
        device, s.imagenet_images, s.imagenet_batch, size=s.imagenet_image)
    for method in ("dense", "bip"):
        for precision, cl in (("bf16", False), ("bf16", True)):
            secs, n = timed_bip_epoch(device, s, precision, cl, s.imagenet_arch, loaders,
                                      steps=s.imagenet_steps, warm=s.warmup, method=method)
            what = precision + (", channels_last" if cl else "")
            rows.append(row("imagenet", f"{method}, {s.imagenet_arch} {s.imagenet_image} px, batch {s.imagenet_batch}, "
                            f"{n} steps, {what}", f"{n * s.imagenet_batch / secs:,.0f} images/s "
                            f"({1000 * secs / n:.0f} ms / step)" + (" (BiP reads 2 batches a step)" if method == "bip" else "")))
    return rows


def ffcv_loaders(device, s: Sizes):
    """ffcv stream of synthetic JPEGs (benchmarks/loader_throughput.py), ImageNet-style crops."""
    import loader_throughput as lt
    from bip.data.ffcv.loader import build_ffcv_loaders
    from bip.data.ffcv.write import source_split, write_beton
    work = Path("/tmp/bip-gpu-check")
    folder = lt.make_jpegs(work / "images", s.imagenet_images, 100, (320, 240))
    beton = work / f"train-{s.imagenet_images}.beton"
    if not beton.exists():
        write_beton(source_split("ImageNet", "train", str(folder))[0], beton, max_resolution=320,
                    jpeg_fraction=1.0, quality=90, workers=8)
    cfg = load_config([], ["data.dataset=ImageNet", f"data.data_dir={folder}", "data.loader=ffcv",
                           f"data.train_beton={beton}", f"data.val_beton={beton}", "data.val_fraction=0",
                           f"data.image_size={s.imagenet_image}", f"data.batch_size={s.imagenet_batch}",
                           "data.num_workers=8", "data.normalize=true"]).data
    spec = load_dataset(cfg)
    return build_ffcv_loaders(cfg, spec, seed=0, streams=2, rank=0, world=1, device=device)


# -- CUDA vs CPU ------------------------------------------------------------------------------

def invariance(device, s: Sizes) -> list[dict]:
    """3 steps of each method in float64 on the device and on the CPU from the same start."""
    rows, cpu = [], torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g))
            for _ in range(6)]
    vs = "CUDA vs CPU" if device.type == "cuda" else "CPU vs CPU (no CUDA)"
    for method, layer_type in [("dense", "dense")] + [(m, t) for m in STEPPED for t in ("unstructured", "filter")]:
        torch.manual_seed(0)
        base = create_model("resnet20s", 10, layer_type).double()
        models = [copy.deepcopy(base).to(d) for d in (cpu, device)]
        methods = [create_method(cfg_for(method, layer_type), mod) for mod in models]
        for i in range(3):
            for m, d in zip(methods, (cpu, device)):
                m.on_epoch_start(0)
                m.step([(x.to(d), y.to(d)) for x, y in data[2 * i:2 * i + m.streams]], i / 10)
        diff, flips = 0.0, 0
        for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
            b = b.cpu()
            if a.dtype == torch.bool:
                flips += int((a != b).sum())
            elif a.is_floating_point():
                diff = max(diff, float((a - b).abs().max()))
        rows.append(row("invariance", f"{vs}, float64, 3 steps: {method} {layer_type}",
                        f"max abs difference {diff:.1e}, {flips} mask entries differ", "<= 1e-9, 0",
                        diff <= 1e-9 and flips == 0))
    return rows


def invariance_tests(device, s: Sizes, timeout: float, quick: bool = False) -> list[dict]:
    """pytest tests/distributed/test_invariance.py (N gloo ranks vs one process); --quick only collects it:
    the CPU test of this script runs beside ``make test``, which runs the file itself."""
    path = ROOT / "tests" / "distributed" / "test_invariance.py"
    if not path.is_file():
        return [row("invariance", "tests/distributed/test_invariance.py", "not in this checkout: skipped")]
    only = ["--collect-only"] if quick else []
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *only, str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-6000:], proc.stderr[-2000:], flush=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-200:]
    if quick:
        summary += " (--quick: collected, not run)"
    return [row("invariance", "pytest tests/distributed/test_invariance.py", summary.strip("= "), "all pass",
                None if quick and proc.returncode == 0 else proc.returncode == 0)]


def _name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
