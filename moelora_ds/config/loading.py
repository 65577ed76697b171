"""Reading a run's configuration: YAML/JSON, `--section.key=value` overrides, coercion to the typed sections with
errors naming the key, then validation."""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from moelora_ds.config.sections import ConfigError, RunConfig
from moelora_ds.config.validation import validate


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check (and gently convert) `value` against a type hint, or raise ConfigError naming `where`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # Optional[X]: X's own message ("expected one of [...]" rather than "X or NoneType")
            return _coerce(value, candidates[0], where)
        errors = []
        for arg in candidates:
            try:
                return _coerce(value, arg, where)
            except ConfigError as error:
                errors.append(error)
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if origin is list and isinstance(value, str):  # --section.key=a,b from the command line
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {where}")


def _build(cls: type, data: Any, where: str, source: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, rejecting unknown keys with a did-you-mean hint."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{where}{key}'{hint}; known keys: {sorted(known)}")
    values = {}
    for key, value in data.items():
        hint = hints[key]
        if is_dataclass(hint):
            values[key] = _build(hint, value, f"{where}{key}.", source)
        else:
            values[key] = _coerce(value, hint, f"{source}: {where}{key}")
    try:
        return cls(**values)
    except ValueError as error:  # MoELoRAConfig's own validation names its key
        raise ConfigError(f"{source}: {error}") from None


def parse_overrides(overrides: list[str]) -> dict:
    """`--a.b=c` strings into a nested dict; values are parsed as YAML scalars/lists."""
    nested: dict = {}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"command line: override {item!r}: expected --section.key=value")
        dotted, raw = text.split("=", 1)
        keys = dotted.split(".")
        node = nested
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: override {item!r} conflicts with another override")
        node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return nested


def _deep_merge(base: dict, updates: dict) -> dict:
    merged = dict(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "deepspeed":
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML/JSON: {error}") from None
    return data or {}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML/JSON file (optional), apply `--section.key=value` overrides, validate everything."""
    data = read_config_file(path) if path else {}
    source = str(path) if path else "<defaults>"
    if overrides:
        data = _deep_merge(data, parse_overrides(list(overrides)))
        source += " + command line"
    config = _build(RunConfig, data, "", source)
    config.source = source
    validate(config)
    return config
