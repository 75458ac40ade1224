"""Rebuild ``ROOT/index.csv`` from the run folders alone: one row per run, with its status.

Jobs never append to a shared file; this scan can be re-run at any time and gives a
byte-identical CSV for the same folders. ``python launch/collect.py ROOT [--plots] [--out DIR]
[--report]`` (--report: then ``python -m bip.report ROOT``, docs/report.md);
``collect(root)`` is the library entry point (the launcher's ``--wait`` and the demo call it).

``status`` is launch/status.py's, the same function ``grid.py --status`` and ``--wait`` use:
the run folder (files + lease) and, when sacct is available, the Slurm state of the job that
any grid manifest under ROOT records for the run. A corrupt run (damaged result.json,
final.pt or config.yaml) gets a row with the path, whatever its files still give, and a
warning on stderr.

Columns: COLUMNS (the export ones from RUN/export.json, empty without it), then every config
field as ``section.key`` (schema order, unknown ones after).
``path`` is relative to ROOT, so the index does not depend on where ROOT is mounted.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/collect.py`: make `launch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bip.rundir.atomic import write_bytes as write_atomic  # noqa: E402
from bip.config import SECTIONS, OneLineParser  # noqa: E402
from bip.config.schema import method_label  # noqa: E402
from bip.errors import BipError  # noqa: E402
from bip.config import identity  # noqa: E402
from bip.config.identity import METRICS  # noqa: E402
from bip.rundir.folder import inspect  # noqa: E402
from launch import plots as plotting  # noqa: E402
from launch import manifest as manifests, slurm as slurm_acct, status as run_status  # noqa: E402

INDEX, SUMMARY = "index.csv", "summary.md"
# From RUN/export.json (python -m bip.export, or a grid's export stage), when there is one.
EXPORT_COLUMNS = (
    "params_thin", "macs_thin", "latency_ms", "latency_ms_dense", "speedup", "latency_batch",
    "latency_device")
STATUSES = run_status.STATES
# bip/compute.py: this run's training passes, FLOPs and seconds, and its lineage's.
COMPUTE_COLUMNS = ("train_passes", "train_forward_passes", "train_backward_passes", "train_flops",
                   "wall_time_s", "lineage_train_passes", "lineage_train_flops", "lineage_wall_time_s")
COLUMNS = (
    "status", "stage", "method", "dataset", "arch", "layer_type", "k", "seed", "run_id", "parent_id",
    "test_acc", "test_top5", "val_acc", "best_val_acc", "best_epoch", "test_acc_at_best_val",
    "kept_fraction", "params_dense", "params_effective", "macs_dense", "macs_effective",
    *EXPORT_COLUMNS, "collapsed", "imp_round", "epochs", *COMPUTE_COLUMNS, "device", "world_size",
    "global_batch_size", "git_sha", "git_dirty",
    "slurm_job_id", "host", "started", "code_changed", "error", "path", "hashed",
)
_FROM_PROVENANCE = ("git_sha", "git_dirty", "slurm_job_id", "host", "started", "device")
_FROM_RESULT = (  # result.json keys that are columns as they are (kept_fraction is nested)
    "stage", "method", "dataset", "arch", "layer_type", "k", "seed", "run_id", "parent_id",
    "test_acc", "test_top5", "val_acc", "best_val_acc", "best_epoch", "test_acc_at_best_val",
    "params_dense", "params_effective", "macs_dense", "macs_effective", "collapsed", "imp_round", "epochs",
    *COMPUTE_COLUMNS, "device", "world_size", "global_batch_size",
)
_STAGE_ORDER = {"pretrain": 0, "prune": 1, "finetune": 2}


def collect(root: Path, plots: bool = False, out: Path | None = None) -> Path:
    """Write ROOT/index.csv (and with ``plots``: ROOT/summary.md and one PNG per panel into
    ``out``, default ROOT/plots); returns the index path. Raises BipError for a missing ROOT
    or, with ``plots``, a missing matplotlib."""
    return _collect(Path(root), plots, out)[0]


def _collect(root: Path, plots: bool, out: Path | None) -> tuple[Path, list[dict]]:
    rows = scan(root)
    index = root / INDEX
    write_atomic(index, index_csv(rows))
    if plots:
        # The summary needs no matplotlib: write it before the PNGs, which may fail.
        entries = plotting.summarize(rows)
        write_atomic(root / SUMMARY, plotting.summary_markdown(entries).encode())
        out_dir = Path(out) if out is not None else root / "plots"
        # + accuracy vs lineage compute, where the runs report it (bip/compute.py)
        for name, png in {**plotting.render_panels(entries), **plotting.render_compute(entries)}.items():
            write_atomic(out_dir / name, png)
    return index, rows


def scan(root: Path, slurm: bool = True) -> list[dict]:
    """One row per run folder under ``root``, sorted deterministically."""
    if not Path(root).is_dir():
        raise BipError(f"{root} is not a directory")
    try:
        folders = run_folders(root)
    except OSError as err:
        raise BipError(f"cannot list {root}: {err.strerror}") from None
    found = {rel: inspect(os.path.join(root, rel)) for rel in folders}
    rows = [read_run(root, rel, found[rel]) for rel in folders]
    _set_status(root, rows, found, slurm)
    rows.sort(key=_sort_key)
    return rows


def run_folders(root: Path) -> list[str]:
    """``<run id>/seed_<s>`` for every run folder; _-prefixed folders belong to the launcher."""
    found = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith((".", "_")) or not entry.is_dir():
                continue
            try:
                with os.scandir(entry.path) as seeds:
                    found += [f"{entry.name}/{s.name}" for s in seeds
                              if s.name.startswith("seed_") and s.is_dir()]
            except OSError as err:  # unreadable: say so, index the rest
                print(f"warning: {entry.name}: cannot list ({type(err).__name__}); skipped", file=sys.stderr)
    return found


def read_run(root: Path, rel: str, found) -> dict:
    """The columns of one run folder (``rel`` is relative to the root) from its inspection."""
    run_id, seed_name = rel.split("/")
    row: dict = {"run_id": run_id, "seed": _int(seed_name[len("seed_"):]), "path": rel}
    if found.config is not None:
        row.update(_config_fields(found.config))
        row["code_changed"] = bool(found.config.get("code_changed"))
    result = found.result
    if result is not None:
        row.update({key: result.get(key) for key in _FROM_RESULT if key in result})
        sparsity = result.get("sparsity")  # null for dense runs
        row["kept_fraction"] = sparsity.get("kept_fraction") if isinstance(sparsity, dict) else None
        row.update(_export_fields(os.path.join(root, rel)))
    elif found.state == "started":
        row["epochs"] = _last_epoch(os.path.join(root, rel))
    row["run_id"] = row.get("run_id") or run_id  # the folder name is the id when files lack it
    return row


def _set_status(root: Path, rows: list[dict], found: dict, slurm: bool) -> None:
    """status (and error) of every row: launch.status.combine over folder, lease, Slurm, parent."""
    jobs = manifests.all_jobs(root)
    wanted = [jobs[rel]["job_id"] for rel, f in found.items() if f.state != "done" and rel in jobs]
    acct = slurm_acct.job_states(wanted) if slurm and wanted else slurm_acct.Accounting()
    by_path = {row["path"]: row for row in rows}
    decided: dict[str, str] = {}

    def decide(rel: str, seen: frozenset) -> str:
        if rel in decided:
            return decided[rel]
        row = by_path[rel]
        parent_rel = f"{row.get('parent_id')}/{rel.split('/')[1]}" if row.get("parent_id") else None
        parent = "done"
        if parent_rel in by_path and parent_rel not in seen:
            parent = decide(parent_rel, seen | {rel})
        job = jobs.get(rel, {}).get("job_id")
        status, detail = run_status.combine(found[rel], acct.state(job), parent, job, acct.error)
        row["status"] = status
        if status in ("failed", "corrupt", "blocked", "unknown"):
            row["error"] = detail
        if status == "corrupt":
            print(f"warning: {rel}: {detail}; marked corrupt", file=sys.stderr)
        decided[rel] = status
        return status

    for rel in by_path:
        decide(rel, frozenset())


def _export_fields(folder: str) -> dict:
    """The export columns; an unreadable export.json leaves them empty (the run is still done)."""
    try:
        doc = json.loads(Path(folder, identity.EXPORT).read_bytes())
        fields = {"params_thin": (doc.get("params") or {}).get("thin"),
                  "macs_thin": (doc.get("macs") or {}).get("thin")}
    except (OSError, ValueError, AttributeError):
        return {}
    return {**fields, **{key: doc.get(key) for key in EXPORT_COLUMNS[2:]}}


def _config_fields(doc: dict) -> dict:
    """Identity columns (as the run id names them), provenance, and ``section.key`` columns."""
    flat = {f"{section}.{key}": json.dumps(value, sort_keys=True, default=str)
            if value.__class__ in (dict, list) else value
            for section, values in doc["config"].items() for key, value in values.items()}
    stage = flat.get("run.stage")
    fields = {
        "run_id": doc["run_id"], "parent_id": doc["parent_id"] or "", "stage": stage,
        # The fields the run id hashes, as config.yaml records them (JSON): what plots key on.
        "hashed": json.dumps(doc["hashed"], sort_keys=True) if isinstance(doc.get("hashed"), dict) else "",
        "method": method_label(stage, flat.get("prune.method")),
        "dataset": flat.get("data.dataset"), "arch": flat.get("model.arch"),
        "layer_type": flat.get("prune.layer_type"), "k": flat.get("prune.k"),
        "seed": flat.get("run.seed"),
    }
    # data.batch_size is per process; configs from before train.world_size ran on one.
    world, batch = flat.get("train.world_size", 1), flat.get("data.batch_size")
    fields["world_size"] = world
    fields["global_batch_size"] = batch * world if isinstance(batch, int) and isinstance(world, int) else None
    provenance = doc["provenance"] if isinstance(doc["provenance"], dict) else {}
    fields.update({key: provenance[key] for key in _FROM_PROVENANCE if key in provenance})
    fields.update(flat)
    return fields


def _last_epoch(folder: str) -> int | None:
    """The last finished epoch in metrics.jsonl; a line cut short by a kill is skipped."""
    try:
        with open(os.path.join(folder, METRICS), "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["epoch"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def _sort_key(row: dict) -> tuple:
    """Grouped as the plots read them: dataset, arch, stage, method, layer type, k descending."""
    k = row.get("k")
    text = [str(row.get(c) or "") for c in ("dataset", "arch", "method", "layer_type", "run_id")]
    return (*text[:2], _STAGE_ORDER.get(str(row.get("stage")), 3), *text[2:4],
            -k if isinstance(k, (int, float)) else 0.0, text[4],
            _int(row["path"].split("/")[1][len("seed_"):]) or 0, row["path"])


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def columns(rows: list[dict]) -> list[str]:
    """Fixed columns, then every config field in schema order, then unknown fields sorted (so
    the header only depends on the set of fields, never on which run came first)."""
    known = [f"{section}.{f}" for section, kind in SECTIONS.items() for f in kind.__dataclass_fields__]
    seen = set().union(*rows) if rows else set()
    extra = sorted(seen - set(COLUMNS) - set(known))
    return [*COLUMNS, *known, *extra]


def index_csv(rows: list[dict]) -> bytes:
    header = columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    # csv writes None as an empty cell and scalars with str(); _config_fields made lists JSON.
    writer.writerows(map(row.get, header) for row in rows)
    return buffer.getvalue().encode()


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="collect.py", description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, metavar="ROOT", help="the runs folder")
    parser.add_argument("--plots", action="store_true",
                        help="also write ROOT/summary.md and one PNG per dataset/arch/layer type")
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: ROOT/plots)")
    parser.add_argument("--report", action="store_true",
                        help="then write ROOT/report/ (index.html, report.md, tables.tex: python -m bip.report)")
    try:
        args = parser.parse_args(argv)
        index, rows = _collect(args.root, args.plots, args.out)
        if args.report:  # imported here: the index alone needs no jinja2/scipy
            from bip.report import report
            report_path = report(args.root)
    except (BipError, OSError) as err:  # OSError: e.g. ROOT is read-only
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.plots:
        print((args.root / SUMMARY).read_text(), end="")
        print(f"plots: {args.out or args.root / 'plots'}")
    counts = {status: sum(row["status"] == status for row in rows) for status in STATUSES}
    print(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), file=sys.stderr)
    print(index, flush=True)
    if args.report:
        print(report_path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
