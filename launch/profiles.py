"""Slurm profiles (slurm/profiles/*.yaml): reading, validation, and their submitit parameters.

A profile is a flat mapping of the keys in ``KEYS``, every one required in a profile file; a
grid may override any of them (``resources:``, per grid or per stage). Nothing about a
particular cluster lives in code: partition, account, time, GPUs and setup lines all come
from the profile.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path

from bip.config import read_yaml
from bip.errors import BipError

PROFILES = Path(__file__).resolve().parents[1] / "slurm" / "profiles"

# key -> (type, smallest allowed value for numbers)
KEYS = {
    "partition": (str, None), "account": (str, None), "qos": (str, None),
    "time_min": (int, 1), "nodes": (int, 1), "gpus_per_node": (int, 0),
    "tasks_per_node": (int, 1), "cpus_per_task": (int, 1), "mem_gb": (float, 0),
    "array_parallelism": (int, 1), "setup": (list, None), "signal_delay_s": (int, 0),
    "max_requeues": (int, 0), "constraint": (str, None), "exclusive": (bool, None),
}
# What a local or in-process run assumes when the grid names no profile.
DEFAULTS = {"partition": "", "account": "", "qos": "", "time_min": 60, "nodes": 1,
            "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1, "mem_gb": 0,
            "array_parallelism": 16, "setup": [], "signal_delay_s": 60, "max_requeues": 3,
            "constraint": "", "exclusive": False}


def profile_path(name: str) -> Path:
    """A profile name (slurm/profiles/<name>.yaml) or a path to a profile file."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise BipError(f"Slurm profile file not found: {path}")
        return path
    path = PROFILES / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise BipError(f"unknown Slurm profile {name!r}; choose one of: {', '.join(known) or '(none)'} "
                       f"(files in {PROFILES}) or give a path")
    return path


def load_profile(name: str) -> dict:
    """The validated profile ``name``; every key must be present."""
    path = profile_path(name)
    values = check(read_yaml(path), str(path))
    missing = [key for key in KEYS if key not in values]
    if missing:
        raise BipError(f"{path}: missing key(s) {', '.join(missing)}")
    return values


def check(values: object, where: str) -> dict:
    """Validate (some) profile keys and coerce them to their types; returns a new dict."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise BipError(f"{where}: expected a mapping of profile keys, got {type(values).__name__}")
    out = {}
    for key, value in values.items():
        if key not in KEYS:
            close = [k for k in KEYS if k.startswith(str(key))] or \
                difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise BipError(f"{where}: unknown profile key {key!r}{hint}; valid: {', '.join(KEYS)}")
        out[key] = _coerce(key, value, where)
    return out


def _coerce(key: str, value: object, where: str) -> object:
    kind, low = KEYS[key]
    bad = BipError(f"{where}: {key}={value!r} is not a valid {kind.__name__}"
                   + (f" >= {low}" if low is not None else ""))
    if kind is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list, bool)):
            raise bad
        return str(value)
    if kind is list:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(line, str) for line in value):
            raise bad
        return list(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < math.inf:
        raise bad  # NaN and inf too: a time or a memory size must be a finite number
    if kind is int and value != int(value):
        raise bad
    return kind(value)


def resolve(profile: dict, overrides: dict, where: str) -> dict:
    """Profile + validated grid overrides, with the GPU / task rule checked."""
    merged = {**DEFAULTS, **profile, **check(overrides, where)}
    gpus, tasks = merged["gpus_per_node"], merged["tasks_per_node"]
    if gpus > 0 and tasks != gpus:
        raise BipError(f"{where}: one training process per GPU: tasks_per_node ({tasks}) must equal "
                       f"gpus_per_node ({gpus})")
    return merged


def world_size(p: dict) -> int:
    return p["nodes"] * p["tasks_per_node"]


def slurm_parameters(p: dict) -> dict:
    """Parameters of submitit's SlurmExecutor.update_parameters (empty values left out)."""
    params = {"time": p["time_min"], "nodes": p["nodes"], "ntasks_per_node": p["tasks_per_node"],
              "cpus_per_task": p["cpus_per_task"], "signal_delay_s": p["signal_delay_s"],
              "array_parallelism": p["array_parallelism"]}
    for key in ("partition", "account", "qos", "constraint"):
        if p[key]:
            params[key] = p[key]
    if p["gpus_per_node"]:
        params["gpus_per_node"] = p["gpus_per_node"]
    if p["mem_gb"]:
        gb = p["mem_gb"]
        params["mem"] = f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"
    if p["setup"]:
        params["setup"] = list(p["setup"])
    if p["exclusive"]:
        params["exclusive"] = True
    return params


def describe(p: dict) -> str:
    parts = [f"{p['nodes']} node x {p['tasks_per_node']} task", f"{p['gpus_per_node']} GPU/node",
             f"{p['cpus_per_task']} CPU/task", f"{p['time_min']} min"]
    if p["mem_gb"]:
        parts.append(f"{p['mem_gb']:g} GB")
    if p["partition"]:
        parts.append(f"partition {p['partition']}")
    return ", ".join(parts)
