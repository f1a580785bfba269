"""How a setting's value is read: YAML values coerced to the annotated type, range checks, overrides.

The dataclasses of ddpm.config declare each setting's type and allowed range; `build_section` checks
a section's values against them, and `parse_override` reads `section.key=value` from the command line.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, get_args, get_origin

import yaml

from ddpm.errors import ConfigError


DECIMAL = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it in canonical form or raise ConfigError."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        if value is None and None not in args:
            raise ConfigError(f"{key}: empty; give it a value")
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(key, value, inner[0])
    if value is None:  # `key=` on the command line, `key:` in YAML, for a setting that needs a value
        raise ConfigError(f"{key}: empty; give it a value")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: {value!r} is not a list; expected a list of {args[0].__name__}")
        return tuple(coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a boolean; use true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        return value
    if tp is float:
        if isinstance(value, str) and DECIMAL.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot before the exponent) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: {value!r} is not a number")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: {value!r} is not a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    """The dataclass `cls` from the settings of section `name`, each value coerced and range-checked."""
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of settings, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown setting; known settings of {name!r} are {', '.join(fields)}")
    out = {}
    for key, value in values.items():
        full = f"{name}.{key}"
        value = coerce(full, value, hints[key])
        check, allowed = fields[key].metadata.get("check", (None, ""))
        if check is not None and value is not None and not check(value):
            raise ConfigError(f"{full}: {value!r} is out of range; allowed: {allowed}")
        out[key] = value
    return cls(**out)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` laid over it, mapping by mapping."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.steps=200` -> (["train", "steps"], 200); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.steps=200")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key, e.g. train.steps")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from None
    return parts, value
