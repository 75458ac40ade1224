"""Grid manifests (``<root>/_grids/<name>.json``): the job id of every submitted run, and the
config.yaml each run gets at submission. Every manifest under the root is read, so a run queued
by ANY grid counts as live for all of them."""
from __future__ import annotations

import json
import time
from pathlib import Path

from bip.config import identity
from bip.rundir.atomic import write_text
from launch.sweep import Plan, Run

def write_configs(plan: Plan, runs: list[Run], submission: dict) -> None:
    """config.yaml of each run about to be submitted (if missing), so the results index shows
    queued and blocked runs too; train() rewrites it with full provenance when it starts."""
    for run in runs:
        path = plan.dir(run) / identity.CONFIG
        if not path.is_file():
            write_text(path, identity.config_yaml(run.cfg, {"submitted": submission}))


def manifest_path(plan: Plan) -> Path:
    return plan.root / "_grids" / f"{plan.name}.json"


def read_manifest(plan: Plan) -> dict:
    return _read_json(manifest_path(plan)) or {"cells": {}, "submissions": []}


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a broken manifest only loses job states
    return doc if isinstance(doc, dict) else None


def all_jobs(root: Path) -> dict[str, dict]:
    """{run key: {job_id, grid, submitted}}: the latest submission of each run by ANY grid
    under ``root`` (every manifest is read)."""
    out: dict[str, dict] = {}
    folder = Path(root) / "_grids"
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        doc = _read_json(path) or {}
        cells = doc.get("cells") if isinstance(doc.get("cells"), dict) else {}
        for key, entry in cells.items():
            if isinstance(entry, dict) and entry.get("job_id"):
                when = float(entry.get("submitted_at", 0) or 0)
                if key not in out or when >= out[key]["submitted"]:
                    out[key] = {"job_id": str(entry["job_id"]), "grid": path.stem, "submitted": when}
    return out


def record(plan: Plan, manifest: dict, submission: dict, job_ids: dict[str, str | None]) -> Path:
    """Add one submission (its arrays and the job id of every run) to the manifest."""
    manifest = {**manifest, "grid": str(plan.path.resolve()), "name": plan.name, "root": str(plan.root)}
    manifest.setdefault("cells", {})
    for run in plan.all_runs():
        entry = manifest["cells"].setdefault(run.key, {})
        entry.update(stage=run.stage, parent=run.parent, label=run.label)
        if run.key in job_ids:
            entry.update(job_id=job_ids[run.key], executor=submission["executor"],
                         submitted_at=submission.get("at", time.time()))
    manifest["submissions"] = manifest.get("submissions", []) + [submission]
    path = manifest_path(plan)
    write_text(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


