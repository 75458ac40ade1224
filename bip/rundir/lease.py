"""A run folder's lease: one trainer owns a folder at a time (bip/runfolder.py uses it).

``owner.json`` is created exclusively and whole (written to a temp file, then hard-linked: link
fails when the name exists) with host, pid (and its start time, so a reused pid is not taken
for the owner), Slurm job id, start time, a heartbeat rewritten atomically by a thread every
``stale_s / 4`` seconds (at most a minute), and ``stale_s``, so every reader judges it the same
way. A lease is free again (``takeover_reason``) when its heartbeat is older than ``stale_s``,
when its pid is gone on this host, or when it belongs to an earlier start of the same Slurm job
(requeued: Slurm killed that one). A takeover renames the stale file aside and checks that it
was still the one judged stale, so two trainers cannot both take one over. An owner whose file
was taken over notices at its next heartbeat (``lost``) and stops without writing.

Every lease has a ``generation`` (the fencing token of bip/rundir/fence.py): one more than the
lease it took over and than any start recorded in config.yaml (``floor``), so a later owner
always holds a higher one. A takeover, the heartbeat's rewrite and the release each check and
change owner.json under the folder's write lock (bip/rundir/lock.py), so none of them can
overwrite or remove a newer owner's file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from bip.config import identity
from bip.rundir import lock
from bip.rundir.atomic import write_json
from bip.errors import BipError
from bip.rundir.origin import slurm_job_id

LOCK_WAIT_S = 10.0  # a takeover waits this long for an owner inside a commit (a few syscalls)


class LeaseHeld(BipError):
    """Another live trainer holds the run folder (the message names it)."""



def owner_problem(path: Path) -> str | None:
    """Why ``owner.json`` can be neither read nor replaced by bip (a directory, no permission),
    or None. Such a file is not a lease: no trainer made it, and none can take it over."""
    if path.is_dir() and not path.is_symlink():
        return (f"{path} is a directory, not a lease file (bip writes owner.json itself): remove it "
                "if nothing in it is yours (rm -r), then run again")
    try:
        path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        return (f"{path} cannot be read ({os.strerror(err.errno) if err.errno else err}): fix its "
                "permissions or remove it, then run again")
    return None


def generation_of(owner: dict | None) -> int:
    """The lease generation an owner.json or a config.yaml start records (0: none recorded)."""
    try:
        return int((owner or {}).get("generation") or 0)
    except (TypeError, ValueError):
        return 0


def describe_owner(owner: dict, generation: bool = False) -> str:
    """Who an owner.json (or a config.yaml start) names, with only what it says: "HOST pid PID
    (Slurm job J)", "pid PID on an unknown host", ...; never "None pid None"."""
    host, pid = owner.get("host"), owner.get("pid")
    if pid is None and not host:
        return "an owner whose owner.json is unreadable"
    if pid is None:
        who = f"a trainer on {host} (pid unknown)"
    else:
        who = f"{host} pid {pid}" if host else f"pid {pid} on an unknown host"
    if owner.get("slurm_job_id"):
        who += f" (Slurm job {owner['slurm_job_id']})"
    if generation and generation_of(owner):
        who += f", generation {generation_of(owner)}"
    return who


def read_owner(path: Path) -> dict | None:
    """owner.json as a dict; a file being created (empty or partial) reads as {"mtime": ...}."""
    try:
        raw = path.read_bytes()
        mtime = path.stat().st_mtime
    except OSError:
        return None
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict):
            return {**doc, "raw": raw}
    except ValueError:
        pass
    return {"mtime": mtime, "raw": raw}


def takeover_reason(owner: dict, now: float | None = None, ask_slurm: bool = False) -> str | None:
    """Why a lease may be taken over, or None while its owner is alive. ``ask_slurm`` (the
    trainer about to claim it): also free when squeue says the owner's Slurm job has ended (a
    node crash or an OOM kill leaves a heartbeat that is only minutes old)."""
    now = time.time() if now is None else now
    stale_s = float(owner.get("stale_s", 600))
    beat = float(owner.get("heartbeat", owner.get("mtime", now)))
    if now - beat > stale_s:
        return f"its heartbeat is {now - beat:.0f} s old (stale after {stale_s:.0f} s)"
    if "pid" not in owner:  # unreadable: being written right now, or left half-written
        return None if now - beat < 30 else "it is unreadable"
    mine = owner.get("token") in _HELD
    job = slurm_job_id()
    if job and owner.get("slurm_job_id") == job and not mine and owner.get("pid") != os.getpid():
        return f"it belongs to an earlier run of Slurm job {job} (requeued)"
    if owner.get("host") == socket.gethostname():
        if owner.get("pid") == os.getpid():
            return None if mine else "an earlier trainer of this process did not release it"
        if not pid_alive(int(owner["pid"]), owner.get("pid_start")):
            return f"process {owner['pid']} is gone"
    job_of_owner = str(owner.get("slurm_job_id") or "")
    if ask_slurm and job_of_owner and not mine and slurm_job_ended(job_of_owner):
        return f"its Slurm job {owner['slurm_job_id']} has ended"
    return None


_LIVE_JOB_STATES = "PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING,REQUEUED,RESIZING,SIGNALING"


def slurm_job_ended(job_id: str) -> bool:
    """True only when squeue answers and does not list ``job_id`` as live (any doubt: False)."""
    if not re.fullmatch(r"\d+(_\d+)?", job_id) or shutil.which("squeue") is None:
        return False
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-t", _LIVE_JOB_STATES, "-o", "%i"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and not out.stdout.strip()


def owner_line(run_dir: Path, owner: dict) -> str:
    if "pid" not in owner:
        return f"{run_dir} is being claimed by another trainer right now"
    age = time.time() - float(owner.get("heartbeat", 0))
    since = f" since {owner['started']}" if owner.get("started") else ""
    return (f"{run_dir} is in use by {describe_owner(owner)}{since}, heartbeat {age:.0f} s ago "
            f"(free after {float(owner.get('stale_s', 600)) / 60:g} min without one)")


def lease_live(owner: dict | None) -> bool:
    return owner is not None and takeover_reason(owner) is None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """True if ``pid`` runs on this host (a zombie is dead; a reused pid has another start)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] not in ("Z", "X") and (start is None or fields[19] == str(start))


def _pid_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


_HELD: set[str] = set()  # tokens of the leases this process holds now


class Lease:
    """Exclusive ownership of a run folder while a trainer runs in it (see the module doc).
    ``floor``: the highest generation config.yaml records (this lease's is higher)."""

    def __init__(self, run_dir: Path, stale_s: float, log=None, floor: int = 0):
        self.run_dir, self.path, self.stale_s = Path(run_dir), Path(run_dir) / identity.OWNER, stale_s
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.interval = min(60.0, stale_s / 4)
        self.floor = floor
        self.lost: dict | None = None
        self.taken_over: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.record: dict = {}

    @property
    def generation(self) -> int:
        return generation_of(self.record)

    def acquire(self) -> None:
        """Take the lease or raise LeaseHeld naming the owner; creates the folder if needed."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            if self._create(self._record(self.floor + 1)):
                return
            owner = read_owner(self.path)
            if owner is None:
                problem = owner_problem(self.path)
                if problem:
                    raise BipError(problem)
                continue  # released meanwhile
            reason = takeover_reason(owner, ask_slurm=True)
            if reason is None:
                raise LeaseHeld(owner_line(self.run_dir, owner))
            if self._take_over(owner, reason):
                return
        raise BipError(f"could not take the lease of {self.run_dir}: other trainers keep claiming it")

    def _record(self, generation: int) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
                "slurm_job_id": slurm_job_id(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "heartbeat": time.time(), "stale_s": self.stale_s, "token": uuid.uuid4().hex,
                "generation": generation}

    def _take_over(self, owner: dict, reason: str) -> bool:
        """Replace a stale owner's file by ours, under the write lock: the old owner cannot be
        inside a commit meanwhile (it would have checked the file before we replaced it)."""
        record = self._record(max(self.floor, generation_of(owner)) + 1)
        try:
            with lock.hold(self.run_dir, timeout=LOCK_WAIT_S):
                if not (self._break(owner) and self._create(record)):
                    return False
        except lock.LockTimeout:
            raise LeaseHeld(f"{self.run_dir}: its stale owner {describe_owner(owner)} holds {lock.NAME} "
                            "(stopped inside a write?); try again once it runs or is gone") from None
        self.taken_over = {k: v for k, v in owner.items() if k != "raw"} | {"reason": reason}
        self.log(f"lease: took over {self.path} from {describe_owner(owner, generation=True)}: {reason} "
                 f"(now generation {record['generation']})")
        return True

    def _create(self, record: dict) -> bool:
        """Create owner.json exclusively and whole: written to a temp file, then hard-linked
        (link fails if the name exists), so a kill never leaves a half-written lease."""
        tmp = self.path.with_name(f".{identity.OWNER}.{record['token'][:12]}.tmp")
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(record, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError:  # a full disk: leave no temp file behind
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # read-only: unlink fails even for a missing file; the error below says why
            raise
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here: exclusive create (a kill may leave it partial)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())
        finally:
            tmp.unlink(missing_ok=True)
        self.record = record
        _HELD.add(record["token"])
        return True

    def _break(self, owner: dict) -> bool:
        """Remove a stale owner file, unless it changed since we judged it (then put it back)."""
        aside = self.path.with_name(f".{identity.OWNER}.{uuid.uuid4().hex[:12]}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            if aside.read_bytes() != owner["raw"]:  # a new owner came in between: restore it
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                return False
            return True
        finally:
            aside.unlink(missing_ok=True)

    def mine(self, owner: dict | None = None) -> bool:
        """owner.json (read now unless given) is this lease's."""
        owner = read_owner(self.path) if owner is None else owner
        return bool(owner and self.record and owner.get("token") == self.record["token"])

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="bip-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                owner = read_owner(self.path)
                if owner is None and os.path.lexists(self.path):
                    continue  # unreadable this moment (NFS): look again at the next beat
                if self.mine(owner):  # an unlocked look first: a lost lease does not take the lock
                    with lock.hold(self.run_dir):
                        if self.mine():
                            self.record["heartbeat"] = time.time()
                            write_json(self.path, self.record)
                            continue
                    owner = read_owner(self.path)
                self.lost = owner or {}
                return
            except OSError as err:  # a full or flaky disk: try again at the next beat
                self.log(f"lease: heartbeat not written ({err})")

    def release(self) -> None:
        """Remove owner.json and the lock file, only while they are still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        token = self.record.get("token")
        try:
            if token and self.mine():
                with lock.hold(self.run_dir):
                    if self.mine():
                        self.path.unlink(missing_ok=True)
                        (self.run_dir / lock.NAME).unlink(missing_ok=True)
        except OSError as err:  # a folder gone read-only: say so, and let the real error through
            self.log(f"lease: {self.path} not removed ({err}); the next trainer takes it over "
                     "(this process is gone)")
        finally:
            _HELD.discard(token)
