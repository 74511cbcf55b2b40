"""Resolve a problem's ``Config``: defaults (or ``SMOKE``), then a config file, then ``--set`` overrides.

Every key is checked against the dataclass fields and every value against the field's type, so a typo or
a wrong type stops the run with a message that lists the valid keys, instead of being silently ignored.
Config files are TOML (``.toml``) or JSON (``.json``) with a flat table of keys.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from ..errors import SpecError


_FIX = "pass a value of that type (--set key=value, or the config file)"


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to the field type ``tp`` (from a string when given on the command line)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except SpecError:
                continue
        raise SpecError(f"config key {key!r}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise SpecError(f"config key {key!r}: {value!r} is not one of {choices}")
    if origin in (tuple, list):
        items = value.split(",") if isinstance(value, str) else list(value)
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise SpecError(f"config key {key!r}: expected {len(args)} comma-separated values, got {value!r}")
            return tuple(coerce(v, a, key) for v, a in zip(items, args))
        inner = args[0] if args else str
        return origin(coerce(v.strip() if isinstance(v, str) else v, inner, key) for v in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise SpecError(f"config key {key!r} expects a bool (true/false), got {value!r}; {_FIX}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise SpecError(f"config key {key!r} expects an int, got {value!r}; {_FIX}")
        try:
            return int(value) if not isinstance(value, str) else int(value, 10)
        except (TypeError, ValueError):  # TypeError: a TOML date or list where an int belongs
            raise SpecError(f"config key {key!r} expects an int, got {value!r}; {_FIX}") from None
    if tp is float:
        if isinstance(value, bool):
            raise SpecError(f"config key {key!r} expects a float, got {value!r}; {_FIX}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SpecError(f"config key {key!r} expects a float, got {value!r}; {_FIX}") from None
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"config key {key!r} expects a string, got {value!r}; {_FIX}")
        return value
    return value


CONFIG_SUFFIXES = (".toml", ".json")


def check_config_path(path: str | Path) -> Path:
    """``path`` names a readable ``.toml`` or ``.json`` file (checked before anything is built).

    Raises:
        FileNotFoundError: it does not exist.
        SpecError: it is a folder, not readable, or of another type; the message says what to pass instead.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--config {path}: the file does not exist; pass the path of a .toml or .json "
                                "file of settings")
    if not path.is_file():
        raise SpecError(f"--config {path} is a folder, not a file; pass the path of a .toml or .json file")
    if path.suffix not in CONFIG_SUFFIXES:
        raise SpecError(f"--config {path}: {path.suffix or 'no extension'} is not a settings format read here; "
                        "write the settings as a .toml or .json file (one flat table of key = value)")
    if not os.access(path, os.R_OK):
        raise SpecError(f"--config {path} is not readable by this user; fix its permissions or pass another file")
    return path


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A flat table of settings from a ``.toml`` or ``.json`` file (nothing in it is executed)."""
    path = check_config_path(path)
    try:
        if path.suffix == ".toml":
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise SpecError(f"--config {path} is not valid {kind} ({err}); fix the file (one flat table of "
                        "key = value settings)") from None
    except OSError as err:
        raise SpecError(f"--config {path} cannot be read ({err.strerror or err}); fix the file or pass another "
                        "one") from None
    if not isinstance(data, dict) or any(isinstance(v, dict) for v in data.values()):
        raise SpecError(f"--config {path} must hold one flat table of key = value settings (no nested tables, "
                        "not a list); move every setting to the top level")
    return data


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``["key=value", ...]`` from ``--set`` into a dict (values stay strings until coerced).

    Raises:
        SpecError: a pair has no ``=`` or an empty key.
    """
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SpecError(f"--set {pair!r} has no '='; write --set KEY=VALUE (e.g. --set features=20)")
        key, value = pair.split("=", 1)
        if not key.strip():
            raise SpecError(f"--set {pair!r} has an empty key; write --set KEY=VALUE (e.g. --set features=20)")
        out[key.strip()] = value.strip()
    return out


def resolve_config(config_cls: type, base: Any, *layers: dict[str, Any]) -> Any:
    """``base`` (a ``config_cls`` instance) with each layer of overrides applied, keys and types checked."""
    hints = typing.get_type_hints(config_cls)
    names = [f.name for f in dataclasses.fields(config_cls)]
    values = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in names:
                raise SpecError(f"unknown config key {key!r} for {config_cls.__module__}.{config_cls.__name__}; "
                                f"valid keys: {', '.join(names)}")
            values[key] = coerce(value, hints[key], key)
    return dataclasses.replace(base, **values)


def config_table(cfg: Any) -> dict[str, Any]:
    """The config as a flat dict of plain values (for the run folder and the trackers)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
