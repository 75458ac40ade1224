"""Exports of a finished run.

``python -m bip.export RUN_DIR [--thin] [--onnx] [--latency] [--nm-sparse]``:
- always: ``dense.pt``, the pruned model as a plain dense state dict with exact zeros;
- ``--thin``: ``thin.pt``, the physically thinned model (bip.export.thin), checked equal to the masked
  one; ``load_thinned(path)`` rebuilds it (weights_only file: state + rebuild spec + meta);
- ``--onnx``: ``thin.pt2`` (torch.export) and ``thin.onnx`` (needs the ``onnx`` extra);
- ``--latency``: dense / masked / thinned forward latency (bip.export.latency) on this machine;
- ``--nm-sparse``: N:M masks to semi-structured sparse weights (bip.export.nm).
Results go to ``RUN_DIR/export.json`` (result.json of a finished run is never modified); the
results index (launch/collect.py) shows them as columns. An export holds the folder's lease
while it writes (bip.rundir.folder.owning), and every file goes through the lease's fence like
a trainer's: two exports of one run do not write at once (the second is told who holds it).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from bip.config import DataConfig, identity
from bip.data import describe_dataset
from bip.errors import BipError
from bip.export.latency import headline, measure
from bip.export.modules import apply_spec
from bip.export.nm import check_pattern, nm_export, nm_of
from bip.export.options import MAX_BATCH, check_input, check_options
from bip.export.thin import dense_copy, thin
from bip.models import create_model
from bip.models.accounting import count_params_and_macs
from bip.pruning.layers import MaskedLayer
from bip.rundir import checkpoint
from bip.rundir import folder as runfolder

THIN_FORMAT = "bip-thin-1"
TOLERANCE = 1e-4


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model as a plain dense state dict: every masked weight multiplied by its mask (so
    pruned weights are exactly zero), scores and masks dropped. Loads into the same arch built
    with layer_type=dense."""
    masked = {name for name, m in model.named_modules() if isinstance(m, MaskedLayer)}
    state = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in masked and leaf in ("scores", "mask"):
            continue
        if module in masked and leaf == "weight":
            value = value * model.get_submodule(module).mask
        state[key] = value.detach().clone()
    return state


# -- thinned models --------------------------------------------------------------------------

def thin_file(thinned: nn.Module, spec: list[dict], meta: dict) -> dict:
    """What ``thin.pt`` holds: tensors and plain containers only (weights_only-loadable)."""
    state = {k: v.detach().cpu().clone() for k, v in thinned.state_dict().items()}
    return {"format": THIN_FORMAT, "spec": spec, "state": state, "meta": meta}


def load_thinned(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The thinned model saved by ``python -m bip.export RUN_DIR --thin``, in eval mode.

    ``model``: the dense architecture to thin (default: built from the file's meta with
    ``bip.models.create_model(arch, num_classes, "dense")``); pass one for models that are not
    in the registry. Raises BipError for a file that is not a thinned model."""
    obj = checkpoint.load(path, "thinned model")
    if obj.get("format") != THIN_FORMAT:
        raise BipError(f"{path} is not a thinned model (format {obj.get('format')!r})")
    if model is None:
        meta = obj["meta"]
        model = create_model(meta["arch"], meta["num_classes"], "dense", **meta.get("model_options", {}))
    apply_spec(model, obj["spec"])
    try:
        model.load_state_dict(obj["state"])
    except RuntimeError as err:
        raise BipError(f"{path} does not fit its architecture: {str(err).splitlines()[0]}") from None
    return model.eval()


def serialized_size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


@torch.no_grad()
def max_abs_diff(a: nn.Module, b: nn.Module, input_shape: tuple[int, ...], batch: int = 4,
                 seed: int = 0) -> tuple[float, float]:
    """(max |a(x) - b(x)|, max |a(x)|) in eval mode on a fixed random batch."""
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(seed))
    a.eval(), b.eval()
    ya, yb = a(x), b(x)
    return float((ya - yb).abs().max()), float(ya.abs().max())


def export_thin(model: nn.Module, input_shape: tuple[int, ...], meta: dict) -> tuple[nn.Module, dict, dict]:
    """(thinned model, thin.pt content, summary) for a masked ``model``; raises if the thinned
    model does not compute the masked one's function (an internal error)."""
    model = model.eval()
    example = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
    thinned, spec, report = thin(model, example)
    diff, scale = max_abs_diff(model, thinned, input_shape)
    if not diff <= TOLERANCE * max(1.0, scale):
        raise RuntimeError(f"thinned model differs from the masked one by {diff:.3g}: a bug in bip.export.thin")
    masked = count_params_and_macs(model, input_shape)
    thin_counts = count_params_and_macs(thinned, input_shape)
    summary = {
        "params": {"dense": masked["params_dense"], "effective": masked["params_effective"],
                   "thin": thin_counts["params_dense"]},
        "macs": {"dense": masked["macs_dense"], "effective": masked["macs_effective"],
                 "thin": thin_counts["macs_dense"], "zero_kept": report["macs_zero_kept"],
                 "fold_per_forward": report["macs_fold_per_forward"]},
        "channel_groups": report["channel_groups"],
        "channel_groups_removed": report["channel_groups_removed"],
        "max_abs_diff": diff, "channels": report["channels"],
    }
    return thinned, thin_file(thinned, spec, meta), summary


# -- a run folder -> export files --------------------------------------------------------------

def load_run(run_dir: Path) -> tuple[nn.Module, dict]:
    """(masked model in eval mode, meta) of a finished run: its published ``final.pt``, or
    ``checkpoint.pt`` for runs that predate it. Raises BipError for anything else."""
    if not (run_dir / identity.RESULT).is_file():
        raise BipError(f"{run_dir} is not a finished run (no {identity.RESULT})")
    path = run_dir / identity.FINAL if (run_dir / identity.FINAL).is_file() else run_dir / identity.CHECKPOINT
    obj = checkpoint.load(path, "run model")
    if isinstance(obj.get("model"), dict):  # {"model": state, "meta": ...}, whatever the format tag
        state, meta = obj["model"], obj.get("meta") or {}
    else:
        state, meta = checkpoint.source_state(path)
    meta = {**_result_meta(run_dir), **meta}
    if "num_classes" not in meta:
        raise BipError(f"{path} is not a bip run checkpoint (no meta.num_classes)")
    model = create_model(meta["arch"], meta["num_classes"], meta["layer_type"],
                         **meta.get("model_options", {}))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise BipError(f"{path} does not fit arch {meta['arch']}: {str(err).splitlines()[0]}") from None
    return model.eval(), meta


def _result_meta(run_dir: Path) -> dict:
    result = json.loads((run_dir / identity.RESULT).read_text())
    return {k: result[k] for k in ("arch", "layer_type", "k", "dataset", "run_id", "seed", "stage",
                                   "method") if k in result}


def input_shape_of(run_dir: Path, meta: dict, size: int | None = None) -> tuple[int, int, int]:
    """(3, S, S): S from ``size``, else the run's dataset resolution (config.yaml)."""
    if size:
        return (3, size, size)
    from dataclasses import fields
    try:
        doc = json.loads((run_dir / identity.CONFIG).read_text())["config"]["data"]
        known = {f.name for f in fields(DataConfig)}
        spec = describe_dataset(DataConfig(**{k: v for k, v in doc.items() if k in known}),
                                meta.get("num_classes", 0))
    except (OSError, ValueError, KeyError, TypeError, BipError) as err:
        raise BipError(f"cannot tell the input size of {run_dir} ({type(err).__name__}: {err}); "
                       "give --input-size") from None
    return (3, spec.image_size, spec.image_size)


def prepare_run(run_dir: Path, thin: bool = False, input_size: int | None = None,
                nm_sparse: bool = False, latency: tuple[int, ...] = (), name=None):
    """(masked model, meta, input shape) of a run that can be exported as asked; BipError if not.
    ``name(option)`` spells an option in messages (default: the command line's flags)."""
    name = name or _flag
    model, meta = load_run(run_dir)
    if thin and meta["layer_type"] not in ("filter", "channel"):
        raise BipError(f"--thin needs a filter or channel run; {run_dir} is {meta['layer_type']}")
    if nm_sparse:
        n, m = nm_of(meta)
        if not check_pattern(model, n, m)["nm"]:
            raise BipError(f"--nm-sparse: no masked layer of {run_dir} keeps exactly {n} of every "
                           f"{m} weights")
    shape = input_shape_of(run_dir, meta, input_size)
    check_input(shape, latency, name)
    return model, meta, shape


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def check_device(device: str, name=_flag) -> None:
    """A CUDA device must exist here (check_options has checked the spelling)."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise BipError(f"{name('device')}={device}: no CUDA GPU is available on this machine")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise BipError(f"{name('device')}={device}: this machine has {torch.cuda.device_count()} CUDA "
                       "device(s)")


def validate(run_dir: Path, thin: bool = False, onnx: bool = False, latency: tuple[int, ...] = (),
             nm_sparse: bool = False, input_size: int | None = None, device: str = "cpu", name=_flag):
    """Every option and the run itself, before anything is written: ``prepare_run``'s result."""
    check_options({"thin": thin, "onnx": onnx, "latency": list(latency), "nm_sparse": nm_sparse,
                   "input_size": input_size, "device": device}, name)
    check_device(device, name)
    return prepare_run(run_dir, thin, input_size, nm_sparse, latency, name)


class _Staged:
    """The files of one export under temporary names until all are written: an export that fails
    half-way (or is killed) leaves the folder's earlier files as they were. Every write, rename
    and removal goes through the folder's fence (a trainer that took the folder over wins)."""

    def __init__(self, folder: runfolder.RunFolder):
        self.folder, self.paths = folder, {}

    def _tmp(self, name: str) -> str:
        self.paths[name] = f".{name}.export-{os.getpid()}.tmp"
        return self.paths[name]

    def save(self, name: str, obj: dict) -> None:
        self.folder.save(self._tmp(name), obj)

    def write_with(self, name: str, write) -> None:
        self.folder.write_with(self._tmp(name), write)

    def size(self, name: str) -> int:
        return (self.folder.path / self.paths[name]).stat().st_size

    def commit(self) -> None:
        for name, tmp in self.paths.items():
            self.folder.rename(tmp, name)
        self.paths = {}

    def discard(self) -> None:
        for tmp in self.paths.values():
            try:
                self.folder.remove(tmp)
            except (BipError, OSError):
                pass  # fenced out or read-only: a later export overwrites or ignores it


def export_run(run_dir: Path, thin: bool = False, onnx: bool = False, latency: tuple[int, ...] = (),
               nm_sparse: bool = False, input_size: int | None = None, device: str = "cpu",
               log=print, name=_flag) -> dict:
    """Write the exports of one finished run and ``RUN_DIR/export.json``; returns its content.
    Every option is checked first; the files are written under the folder's lease (fenced writes,
    bip/rundir/fence.py), staged under temporary names, and renamed into place only once every
    export succeeded."""
    model, meta, shape = validate(run_dir, thin, onnx, latency, nm_sparse, input_size, device, name)
    with runfolder.owning(run_dir, _stale_min(run_dir)) as folder:
        staged = _Staged(folder)
        try:
            doc = _export(model, meta, shape, staged, thin, onnx, latency, nm_sparse, device, log)
            staged.commit()
        finally:
            staged.discard()
        folder.write_json(identity.EXPORT, doc)
        return doc


def _stale_min(run_dir: Path) -> float:
    """The run's run.lease_stale_min (config.yaml), else the default."""
    doc, _ = runfolder.read_config(run_dir, {identity.CONFIG})
    try:
        value = float(doc["config"]["run"]["lease_stale_min"])
    except (TypeError, KeyError, ValueError):
        return 10.0
    return value if value > 0 else 10.0


def _export(model, meta, shape, staged: "_Staged", thin, onnx, latency, nm_sparse, device, log) -> dict:
    doc: dict = {"status": "done", "run_id": meta.get("run_id"), "arch": meta["arch"],
                 "layer_type": meta["layer_type"], "k": meta.get("k"), "input_shape": list(shape),
                 "files": {}, "size_bytes": {}}
    dense_state = dense_state_dict(model)
    staged.save("dense.pt", dense_state)
    doc["files"]["dense"] = "dense.pt"
    doc["size_bytes"] = {"dense": staged.size("dense.pt"),
                         "masked": serialized_size(model.state_dict())}
    thinned = None
    if thin:
        thinned, content, summary = export_thin(model, shape, meta)
        staged.save("thin.pt", content)
        doc["files"]["thin"] = "thin.pt"
        doc["size_bytes"]["thin"] = staged.size("thin.pt")
        doc.update(summary)
        log(f"thin.pt: params {summary['params']['thin']:,} (masked effective "
            f"{summary['params']['effective']:,}), MACs {summary['macs']['thin']:,} (effective "
            f"{summary['macs']['effective']:,}; zero weights kept by coupling: "
            f"{summary['macs']['zero_kept']:,}), max |thin - masked| = {summary['max_abs_diff']:.2g}")
        if onnx:
            doc["files"].update(export_programs(thinned, shape, staged, log))
    if nm_sparse:
        doc["nm"] = nm_export(model, meta, device, log)
    if latency:
        models = {"dense": dense_copy(model), "masked": model, "thin": thinned}
        doc["latency"] = measure({k: v for k, v in models.items() if v is not None}, shape, latency, device)
        doc.update(headline(doc["latency"]))
        log(f"latency ({doc['latency_device']}, batch {doc['latency_batch']}): thin "
            f"{doc['latency_ms']} ms, dense {doc['latency_ms_dense']} ms, speedup {doc['speedup']}x")
    return doc


def export_finished_run(run_dir: Path, options: dict, log=print) -> dict:
    """A grid's export stage (launch/gridfile.py ``stages.export``), run by the job that trained
    the run, right after it published its result. A failure is recorded in export.json and
    reported, but does not fail the finished run."""
    import traceback
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return export_run(run_dir, options.get("thin", False), options.get("onnx", False),
                          tuple(options.get("latency") or ()), options.get("nm_sparse", False),
                          options.get("input_size") or None, device, log,
                          name=lambda key: f"stages.export.{key}")
    except Exception as err:  # noqa: BLE001 - the training result stands; say what went wrong
        log(traceback.format_exc(limit=4))
        doc = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        if isinstance(err, (runfolder.LeaseHeld, runfolder.FencedOut)):
            return doc  # another process holds the folder: its files are not ours to write
        try:
            with runfolder.owning(run_dir, _stale_min(run_dir)) as folder:
                folder.write_json(identity.EXPORT, doc)
        except (BipError, OSError) as again:  # the disk that failed the export (full, read-only)
            log(f"{identity.EXPORT} not written: {again}")
        return doc


def export_programs(thinned: nn.Module, shape, staged: "_Staged", log) -> dict:
    """thin.pt2 (torch.export, batch size dynamic) and, with the onnx extra, thin.onnx."""
    x = torch.randn(2, *shape)
    dims = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)
    program = torch.export.export(thinned.eval(), (x,), dynamic_shapes=dims)
    staged.write_with("thin.pt2", lambda f: torch.export.save(program, f))
    files = {"torch_export": "thin.pt2"}
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        log("onnx export skipped: onnx is not installed (pip install -e '.[onnx]'); "
            "wrote the torch.export program thin.pt2")
        return files
    onnx_program = torch.onnx.export(thinned.eval(), (x,), dynamo=True, dynamic_shapes=dims, verbose=False,
                                     input_names=["input"], output_names=["logits"])
    staged.write_with("thin.onnx", lambda f: f.write(onnx_program.model_proto.SerializeToString()))
    files["onnx"] = "thin.onnx"
    return files


def main(argv=None) -> int:
    """``python -m bip.export RUN_DIR... [--thin] [--onnx] [--latency [B ...]] [--nm-sparse]``:
    finished runs -> dense-with-zeros weights, thinned models, latency, export.json."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m bip.export", description=main.__doc__.split(":")[0])
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    p.add_argument("--thin", action="store_true", help="write thin.pt, the physically thinned model")
    p.add_argument("--onnx", action="store_true", help="with --thin: thin.pt2 (torch.export) and thin.onnx")
    p.add_argument("--latency", type=int, nargs="*", metavar="BATCH",
                   help="measure dense / masked / thinned latency at these batch sizes (default 1 64)")
    p.add_argument("--nm-sparse", action="store_true",
                   help="N:M masks -> semi-structured sparse weights (CUDA)")
    p.add_argument("--input-size", type=int, help="input resolution (default: the run's dataset)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.onnx and not args.thin:
        p.error("--onnx needs --thin")
    latency = tuple(args.latency or (1, 64)) if args.latency is not None else ()
    try:
        for run_dir in args.run_dirs:  # every option and every folder before writing anything
            validate(run_dir, args.thin, args.onnx, latency, args.nm_sparse, args.input_size, args.device)
        for run_dir in args.run_dirs:
            export_run(run_dir, args.thin, args.onnx, latency, args.nm_sparse, args.input_size,
                       args.device, log=lambda text: print(text, file=sys.stderr))
            print(run_dir / identity.EXPORT)
    except BipError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
