"""Loading a Config: YAML files (in order), then seed-README flags, then ``section.key=value``.

Precedence is defaults < YAML files < command line. YAML may use the original BiP repository's
flat keys (``arch: resnet20s``) or our sections (``optim: {lr: 0.1}``); bip.config.schema
coerces every value to its field's type and names the closest keys for an unknown one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from bip.config.schema import SECTIONS, Config, build_config
from bip.errors import BipError


def flatten_yaml(data: Any, origin: str) -> list[tuple[str, Any, str]]:
    """YAML mapping -> (dotted key, value, origin) in file order; nested sections allowed."""
    if data is None:
        return []
    if not isinstance(data, dict):
        raise BipError(f"{origin}: expected a mapping of keys to values, got {type(data).__name__}")
    out = []
    for key, value in data.items():
        key = str(key)
        if key in SECTIONS and isinstance(value, dict):
            out += [(f"{key}.{sub}", v, origin) for sub, v in value.items()]
        else:
            out.append((key, value, origin))
    return out


class DuplicateKey(yaml.YAMLError):
    """A mapping that gives one key twice (PyYAML keeps the last silently)."""

    def __init__(self, key: Any, first: int, second: int):
        super().__init__(f"duplicate key {key!r} (lines {first} and {second})")
        self.key, self.lines = key, (first, second)


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: in a config, grid or
    profile the second value would silently win. Merge keys (``<<: *base``) may still be
    overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:  # an unhashable key: the base class reports it
                    continue
        return super().construct_mapping(node, deep)


def safe_load(text: str | bytes) -> Any:
    """yaml.safe_load that refuses duplicate keys (every YAML bip and launch read goes here).
    The loader is a yaml.SafeLoader subclass, driven directly (what yaml.safe_load does with
    its own SafeLoader), so no unsafe constructor is ever reachable."""
    loader = UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise BipError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise BipError(f"cannot read {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise BipError(f"{path}: not UTF-8 text (byte {err.start}); a YAML file is expected") from None
    try:
        return safe_load(text)
    except DuplicateKey as err:
        raise BipError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise BipError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None


def load_config(yaml_files: Iterable[str | Path] = (), overrides: Iterable[str] = (),
                flags: dict[str, Any] | None = None) -> Config:
    """YAML files, then seed-style ``flags`` (flat keys), then ``section.key=value`` strings.
    train.world_size starts from the environment's WORLD_SIZE (torchrun, accelerate launch), so
    a run started under torchrun gets the identity of its process count."""
    items: list[tuple[str, Any, str]] = [("train.world_size", os.environ.get("WORLD_SIZE") or 1,
                                          "environment (WORLD_SIZE)")]
    for path in yaml_files:
        items += flatten_yaml(read_yaml(path), str(path))
    items += [(key, value, "flag") for key, value in (flags or {}).items()]
    for text in overrides:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise BipError(f"expected section.key=value, got {text!r}")
        # Kept as text: _coerce converts it to the field's type ("no" stays a string).
        items.append((key.strip(), value.strip(), "cli"))
    return build_config(items)
