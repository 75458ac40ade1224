"""The life of one run folder: who owns it, what state its files are in, and how it changes.

- **Ownership** (bip/rundir/lease.py): a trainer takes the folder's lease before it writes anything
  (``owner.json``: host, pid, Slurm job id, start time, a heartbeat every minute, a generation).
  A second trainer finds it held and stops with one line naming the owner; a stale or dead
  owner's lease is taken over, logged, and recorded in config.yaml.
- **Fencing** (bip/rundir/fence.py): every write of ``RunFolder`` (and of bip.export, through
  ``owning``) goes through the lease's ``Fence``, which commits only while owner.json is still
  this trainer's; a trainer whose lease went to a newer generation raises ``FencedOut`` and
  writes nothing more.
- **State from files** (``inspect``; one function for train, ``grid.py --status`` and
  ``collect.py``): done only when result.json parses, config.yaml parses and the model file it
  names (final.pt) passes a cheap header check; damaged outputs make the run ``corrupt``.
- **Immutable outputs**: ``publish`` writes mask.pt, final.pt, then result.json, each atomically:
  result.json appears last, so a final.pt without it was never published and is replaced; a
  published one is never rewritten (a corrupt run's outputs are moved aside first).
- **Starts**: each start appends its provenance (sha, host, job, time, where it resumed) to the
  ``history`` of config.yaml, removes temp files of killed writes, old error files and metric
  lines the checkpoint does not cover.
- **Step boundaries** (stop requests, checkpoint cadence, a lost lease): bip/rundir/boundary.py.

Import stays light (no torch): the results index reads 10,000 folders with ``inspect``.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from contextlib import contextmanager

import yaml

from bip.config import identity
from bip.config.load import DuplicateKey, safe_load
from bip.errors import BipError
from bip.rundir.atomic import write_json, write_text
from bip.rundir.diskerror import writing
from bip.rundir.fence import Fence, FencedOut
from bip.rundir.lease import (Lease, LeaseHeld, generation_of, lease_live, owner_line, owner_problem,
                              read_owner, takeover_reason)

CONFIG_KEYS = ("run_id", "parent_id", "config", "provenance")


# -- files -> state ----------------------------------------------------------------------------

@dataclass
class Inspection:
    state: str            # done | corrupt | failed | started | waiting | new
    detail: str
    names: frozenset
    result: dict | None   # parsed result.json (also for corrupt runs, when it parses)
    config: dict | None   # parsed config.yaml
    owner: dict | None    # parsed owner.json (lease), if any


def inspect(run_dir: str | Path) -> Inspection:
    """The state of a run folder from its files alone (leases and Slurm: launch/status.py)."""
    run_dir = Path(run_dir)
    try:
        names = frozenset(os.listdir(run_dir))
    except OSError:
        return Inspection("new", "", frozenset(), None, None, None)
    owner = read_owner(run_dir / identity.OWNER) if identity.OWNER in names else None
    config, config_problem = read_config(run_dir, names)
    if identity.RESULT in names:
        result, problem = _read_result(run_dir / identity.RESULT)
        if result is not None:
            model = model_file(run_dir, result)
            if not model_file_ok(model, (result.get("final") or {}).get("bytes")):
                problem = f"{model.name} is missing or damaged"
        problem = problem or config_problem
        if problem:
            return Inspection("corrupt", problem, names, result, config, owner)
        return Inspection("done", "", names, result, config, owner)
    errors = sorted(n for n in names if n.startswith("error.") and n.endswith(".json"))
    if errors:
        return Inspection("failed", first_error(run_dir, errors), names, None, config, owner)
    if {identity.CHECKPOINT, identity.METRICS, identity.FINAL} & names:
        if config_problem and identity.CONFIG in names:
            return Inspection("corrupt", config_problem, names, None, None, owner)
        return Inspection("started", "", names, None, config, owner)
    return Inspection("waiting" if identity.CONFIG in names else "new", "", names, None, config, owner)


def model_file(run_dir: Path, result: dict) -> Path:
    """The published model of a done run: final.pt (runs from before final.pt: checkpoint.pt)."""
    final = result.get("final")
    name = final.get("file", identity.FINAL) if isinstance(final, dict) else identity.CHECKPOINT
    return Path(run_dir) / name


def model_file_ok(path: Path, size: int | None = None) -> bool:
    """Cheap check that a torch file is whole: the recorded size, and a zip directory (stored at
    the END of the file, so a cut-short or emptied file fails) holding a pickle."""
    try:
        if size is not None and os.path.getsize(path) != size:
            return False
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("data.pkl") for name in z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _read_result(path: Path) -> tuple[dict | None, str | None]:
    try:
        result = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None, f"{identity.RESULT} is not valid JSON"
    return (result, None) if isinstance(result, dict) else (None, f"{identity.RESULT} is not a JSON object")


def read_config(run_dir: Path, names) -> tuple[dict | None, str | None]:
    """(parsed config.yaml, problem). bip writes it in JSON syntax ending in a newline (a
    missing newline means a cut-short write); a file edited by hand as YAML still reads."""
    if identity.CONFIG not in names:
        return None, f"{identity.CONFIG} is missing"
    try:
        data = (Path(run_dir) / identity.CONFIG).read_bytes()
    except OSError as err:
        return None, f"{identity.CONFIG} is unreadable ({type(err).__name__})"
    if not data.endswith(b"\n"):
        return None, f"{identity.CONFIG} is truncated"
    try:
        doc = json.loads(data)
    except ValueError:
        try:
            doc = safe_load(data)
        except DuplicateKey as err:  # a hand edit whose second value would silently win
            return None, f"{identity.CONFIG} has a {err}"
        except yaml.YAMLError:
            return None, f"{identity.CONFIG} is not valid YAML"
    if not (isinstance(doc, dict) and all(key in doc for key in CONFIG_KEYS)
            and isinstance(doc["config"], dict)
            and all(isinstance(section, dict) for section in doc["config"].values())):
        return None, f"{identity.CONFIG} is incomplete"
    return doc, None


def first_error(run_dir: Path, names: list[str]) -> str:
    """The message of the rank that failed first (the others often only see a collective
    time out), else error.json's."""
    found = []
    for name in names:
        try:
            doc = json.loads((Path(run_dir) / name).read_bytes())
            found.append((name == identity.ERROR, float(doc.get("time", 0)), str(doc.get("error", "?"))))
        except (OSError, ValueError, AttributeError, TypeError):
            found.append((True, float("inf"), f"{name} is unreadable"))
    found.sort()
    return found[0][2].splitlines()[0] if found[0][2] else "?"


# -- stop requests and the checkpoint cadence ----------------------------------------------------

# -- the folder as a trainer uses it -------------------------------------------------------------

class RunFolder:
    """One trainer's handle on its run folder. Only the main rank writes (other ranks: their
    error files); ``owned`` says whether this run holds the lease (error files go only into an
    owned folder). Every write goes through ``self.fence`` (bip/rundir/fence.py)."""

    def __init__(self, path: Path, stale_min: float, main: bool = True):
        self.path, self.main = Path(path), main
        self.stale_s = stale_min * 60
        self.lease: Lease | None = None
        self.fence: Fence | None = None
        self.owned = self.started = False
        self.had_state = False

    def done_result(self) -> dict | None:
        found = inspect(self.path)
        return found.result if found.state == "done" else None

    def check_free(self) -> None:
        """Fail at once (before any work) if a live trainer holds the folder, or its owner.json
        is no lease file at all; writes nothing. Only the first process of a multi-process run
        asks (the others would see its lease)."""
        if int(os.environ.get("RANK", "0") or 0) != 0:
            return
        problem = owner_problem(self.path / identity.OWNER)
        if problem:
            raise BipError(problem)
        owner = read_owner(self.path / identity.OWNER)
        if owner is not None and takeover_reason(owner, ask_slurm=True) is None:
            raise LeaseHeld(owner_line(self.path, owner))

    def claim(self) -> dict | None:
        """Main rank: take the lease, then set aside damaged outputs and remove temp files of
        killed writes. Returns the result if another trainer finished the run meanwhile."""
        lease = Lease(self.path, self.stale_s, floor=max(map(generation_of, self.starts()), default=0))
        with writing(self.path / identity.OWNER):  # a full or read-only disk: one line
            lease.acquire()
        self.lease, self.owned = lease, True
        self.adopt(lease.record["token"], lease.generation)
        found = inspect(self.path)
        if found.state == "done":
            return found.result
        self.had_state = bool({identity.CHECKPOINT, identity.METRICS, identity.FINAL} & found.names)
        if found.state == "corrupt":
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for name in (identity.RESULT, identity.FINAL, identity.MASK, identity.CONFIG):
                if name in found.names and (name != identity.CONFIG or found.config is None):
                    self.set_aside(name, stamp)
        for name in found.names:  # atomic writes of a killed process: .<name>.<random>.tmp
            if name.startswith(".") and name.endswith((".tmp", ".stale")):
                self.fence.remove(name)
        self.lease.start_heartbeat()
        return None

    def fence_id(self) -> tuple[str, int] | None:
        """(token, generation) of the lease, for the other ranks (``adopt``)."""
        return (self.fence.token, self.fence.generation) if self.fence else None

    def adopt(self, token: str, generation: int) -> None:
        """Write only while the lease (token, generation) holds the folder (every rank)."""
        self.fence = Fence(self.path, token, generation, starts=self.starts)

    def starts(self) -> list[dict]:
        """The starts config.yaml records (its history), oldest first."""
        doc, _ = read_config(self.path, {identity.CONFIG})
        history = (doc or {}).get("history")
        return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []

    def set_aside(self, name: str, stamp: str | None = None) -> Path:
        target = self.path / f"{name}.corrupt-{stamp or time.strftime('%Y%m%d-%H%M%S')}"
        self._fence().rename(name, target.name)
        print(f"{self.path / name} is damaged: moved to {target.name}", file=sys.stderr, flush=True)
        return target

    def start(self, config_text: str, entry: dict, resumed_epoch: int) -> None:
        """Record this start (config.yaml: config + provenance + history of every start), drop
        error files of earlier attempts and metric lines the resumed state does not cover."""
        self.started = True
        if not self.main:
            return
        doc = json.loads(config_text)
        names = {identity.CONFIG} if (self.path / identity.CONFIG).exists() else set()
        old, _ = read_config(self.path, names)
        history = [h for h in (old or {}).get("history", []) if isinstance(h, dict)]
        if self.lease and self.lease.taken_over:
            entry["took_over"] = {k: self.lease.taken_over.get(k)
                                  for k in ("host", "pid", "slurm_job_id", "generation", "reason")}
        entry["generation"] = self._fence().generation
        history.append(entry)
        codes = sorted({(h.get("git_sha"), h.get("git_dirty"), h.get("code")) for h in history},
                       key=lambda c: [str(x) for x in c])
        doc.update(history=history, code_changed=len(codes) > 1)
        if old and old.get("provenance", {}).get("submitted"):
            doc["submitted"] = old["provenance"]["submitted"]
        elif old and old.get("submitted"):
            doc["submitted"] = old["submitted"]
        if len(codes) > 1:
            print(f"warning: {self.path} resumes under other code than it started with: "
                  + " -> ".join(str(c[0])[:10] + ("+dirty" if c[1] else "") for c in codes),
                  file=sys.stderr, flush=True)
        self.write_text(identity.CONFIG, json.dumps(doc, indent=1) + "\n")
        for name in os.listdir(self.path):
            if name.startswith("error.") and name.endswith(".json"):
                self._fence().remove(name)
        kept = trim_metrics(self.path / identity.METRICS, resumed_epoch)
        if kept is not None:
            self.write_text(identity.METRICS, kept)

    # -- the writes (each one fenced) -----------------------------------------------------------

    def _fence(self) -> Fence:
        if self.fence is None:  # a bug, not a user error: every write needs the lease first
            raise RuntimeError(f"{self.path}: a write before the lease was taken")
        return self.fence

    def write_text(self, name: str, text: str, exclusive: bool = False) -> None:
        data = text.encode()
        self._fence().write(name, lambda f: f.write(data), exclusive)

    def write_json(self, name: str, obj, exclusive: bool = False) -> None:
        self.write_text(name, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n", exclusive)

    def write_with(self, name: str, write) -> None:
        """``write(file)`` into ``name`` (e.g. torch.export.save)."""
        self._fence().write(name, write)

    def rename(self, name: str, new_name: str) -> None:
        """``name`` -> ``new_name`` inside the folder (a staged export file into place)."""
        self._fence().rename(name, new_name)

    def remove(self, name: str) -> None:
        self._fence().remove(name)

    def save(self, name: str, obj: dict) -> None:
        """A torch file (checkpoint.pt, rewind.pt, ...), from the main rank."""
        if self.main:
            import torch
            self._fence().write(name, lambda f: torch.save(obj, f))

    def append_metrics(self, row: dict) -> None:
        """An epoch's line of metrics.jsonl, from the main rank."""
        if self.main:
            self._fence().append(identity.METRICS, json.dumps(row, sort_keys=True) + "\n")

    def publish(self, final: dict, result: dict, mask: dict | None) -> dict:
        """mask.pt, final.pt, then result.json (whose presence makes the run done; it is
        committed only where none exists, so a published result is never replaced)."""
        if not self.main:
            return result
        if mask is not None:
            self.save(identity.MASK, mask)
        self.save(identity.FINAL, final)
        size = os.path.getsize(self.path / identity.FINAL)
        result = {**result, "final": {"file": identity.FINAL, "bytes": size}}
        self.write_json(identity.RESULT, result, exclusive=True)
        return result

    def fail(self, err: BaseException, rank: int) -> None:
        """error.rank<N>.json from every rank that raised (rank 0 also error.json), only in a
        folder this run owns, and never into a run whose earlier state this start had not yet
        taken over (a failure before training starts leaves an existing run untouched). A
        trainer fenced out writes nothing: the folder is not its own any more."""
        if not (self.owned or self.started) or (self.had_state and not self.started):
            return
        if isinstance(err, FencedOut) or self.fence is None or self.fence.out is not None:
            return
        record = {"status": "failed", "error": f"{type(err).__name__}: {err}", "rank": rank,
                  "time": time.time(), "host": socket.gethostname()}
        try:
            self.write_json(identity.rank_error(rank), record)
            if rank == 0:
                self.write_json(identity.ERROR, record)
        except (OSError, BipError):
            pass  # the folder is the problem, or another trainer's now; the exception still reaches the caller

    def fenced_out(self) -> FencedOut | None:
        """The FencedOut of a folder this run held and another trainer holds now, else None."""
        if not self.owned or self.fence is None:
            return None
        return self.fence.fenced_out()

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def lease_lost(self) -> bool:
        return self.lease is not None and self.lease.lost is not None

    def check_lease(self, lost: bool | None = None) -> None:
        """Raise FencedOut (on every rank, given the agreed ``lost``) once the lease went to
        another trainer."""
        if lost or (lost is None and self.lease_lost()):
            self.owned = self.started = False  # the folder is someone else's now: write nothing
            who = self.lease.lost if self.lease is not None else None
            fence = self.fence or Fence(self.path, "", 0, starts=self.starts)
            raise fence.fenced(who or read_owner(self.path / identity.OWNER))


@contextmanager
def owning(run_dir: Path, stale_min: float = 10.0):
    """Hold the lease of a run folder while writing files into it from outside the trainer (bip.export):
    yields a RunFolder whose writes are fenced. A live trainer holding it: LeaseHeld."""
    folder = RunFolder(Path(run_dir), stale_min)
    lease = Lease(folder.path, folder.stale_s, floor=max(map(generation_of, folder.starts()), default=0))
    problem = owner_problem(folder.path / identity.OWNER)
    if problem:
        raise BipError(problem)
    with writing(folder.path / identity.OWNER):  # a full or read-only disk: one line
        lease.acquire()
    folder.lease, folder.owned = lease, True
    folder.adopt(lease.record["token"], lease.generation)
    lease.start_heartbeat()
    try:
        yield folder
    finally:
        folder.release()


def trim_metrics(path: Path, epoch: int) -> str | None:
    """On resume, metrics.jsonl without the lines of epochs the checkpoint does not cover (None:
    no file, or nothing to drop)."""
    if not path.is_file():
        return None
    text, keep = path.read_text(), []
    for line in text.splitlines():
        try:
            if json.loads(line)["epoch"] <= epoch:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill
    kept = "".join(line + "\n" for line in keep)
    return None if kept == text else kept


def record_setup_error(run_dir: Path, err: BaseException) -> bool:
    """For the launcher's job: a run that could not even start (bad --resume, missing data)
    records why in error.json, but only in a folder that holds nothing of a run yet (the
    config.yaml written at submission) and that no live trainer owns."""
    found = inspect(run_dir)
    if found.state not in ("waiting",) or lease_live(found.owner):
        return False
    try:
        write_json(Path(run_dir) / identity.ERROR, {"status": "failed", "error": f"{type(err).__name__}: {err}",
                                                    "rank": 0, "time": time.time(), "host": socket.gethostname()})
    except OSError:  # a full or read-only disk (often the error itself): the job log says it
        return False
    return True
