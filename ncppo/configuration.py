"""Typed dataclass configurations: YAML mappings and ``section.key=value`` overrides checked against the
dataclasses' type hints, with errors that name the key.

The generic part of every ncppo config (training, the toy world): :func:`check_type` coerces a value to
a type hint (``int`` -> ``float`` where a float is wanted, a YAML list -> a ``tuple``) or raises a
:class:`ConfigError` naming the key; :func:`apply` sets values on a mutable dataclass in place and
:func:`updated` returns an updated copy of a (frozen) one; :func:`check_choice` checks a value against
the choices of the module that owns them; :func:`parse_overrides` turns
``["a.b=1"]`` into ``{"a": {"b": 1}}`` (values read as YAML); :func:`read_mapping` reads a YAML file that
must hold a mapping; :func:`did_you_mean` is the one close-match hint of the project.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from pathlib import Path

from ncppo.errors import NcppoError


class ConfigError(NcppoError, ValueError):
    """A bad configuration; the message names the key."""


def did_you_mean(word, choices: Iterable, quote: str = "'", prefix: str = "") -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to ``word``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"; did you mean {quote}{prefix}{close[0]}{quote}?" if close else ""


def check_choice(value, choices: Iterable, key: str):
    """``value`` when it is one of ``choices``, else a :class:`ConfigError`
    ``KEY: 'x' is not one of a, b; did you mean 'a'?``."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}{did_you_mean(value, choices)}")
    return value


def type_name(hint) -> str:
    """A type hint as a config user reads it: ``int``, ``float | null``, ``list[str]``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(type_name(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple):
        return "list"
    return getattr(hint, "__name__", str(hint)).replace("NoneType", "null")


def check_type(value, hint, key: str):
    """``value`` coerced to ``hint`` (ints become floats where floats are wanted, lists become tuples where
    tuples are wanted, YAML's string ``1e-8`` a float) or a :class:`ConfigError` naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return check_type(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {type_name(hint)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(args) != len(value):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(check_type(v, item, f"{key}[{i}]") for i, (v, item) in enumerate(zip(value, args)))
    if hint is typing.Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-8 as a string
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {type_name(hint)}, got {value!r}")
    return value


def _hints(obj) -> dict:
    return typing.get_type_hints(type(obj))


def apply(obj, values: dict, prefix: str = "", adjust=None) -> None:
    """Set ``values`` (a nested mapping) on the mutable dataclass ``obj`` in place, type-checked; an unknown
    key is a :class:`ConfigError` ``unknown config key 'a.b'; did you mean 'a.c'?``. ``adjust(key, value,
    hint)``, when given, maps a value before its check (e.g. YAML's ``no`` read as false)."""
    hints = _hints(obj)
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}{did_you_mean(key, names, prefix=prefix)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of {type(current).__name__} keys, got {value!r}")
            if current.__dataclass_params__.frozen:  # a library's own frozen options (e.g. ColumnMapping)
                setattr(obj, key, updated(current, value, full))
            else:
                apply(current, value, f"{full}.", adjust)
        else:
            if adjust is not None:
                value = adjust(full, value, hints[key])
            setattr(obj, key, check_type(value, hints[key], full))


def updated(obj, values: dict, where: str):
    """A copy of the (frozen) dataclass ``obj`` with ``values`` (a nested mapping) in place, type-checked;
    errors name the key as ``WHERE.section.key`` and list the valid keys of an unknown one's section."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of {type(obj).__name__} keys, got {values!r}")
    hints = _hints(obj)
    names = [f.name for f in dataclasses.fields(obj)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        hint = did_you_mean(unknown[0], names) if len(unknown) == 1 else ""
        raise ConfigError(f"{where}: unknown key(s) {unknown}{hint}; expected {sorted(names)}")
    changes = {}
    for key, value in values.items():
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = updated(current, value or {}, f"{where}.{key}")
        else:
            changes[key] = check_type(value, hints[key], f"{where}.{key}")
    return dataclasses.replace(obj, **changes)


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}, "c": 2}`` -> ``{"a.b": 1, "c": 2}`` (the inverse of :func:`nested`)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def nested(dotted: dict) -> dict:
    """``{"a.b": 1, "c": 2}`` -> ``{"a": {"b": 1}, "c": 2}``."""
    out: dict = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is set to a value and used as a section")
        node[leaf] = value
    return out


def parse_overrides(overrides: Iterable[str]) -> dict:
    """``["objective.beta=2500", "max_steps=10"]`` -> nested dict, values parsed as YAML."""
    import yaml

    dotted = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            dotted[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not YAML ({err})") from err
    return nested(dotted)


def read_mapping(path: str | Path, what: str = "the config") -> dict:
    """The YAML mapping in ``path`` (an empty file is ``{}``); an unreadable file or another kind of YAML
    document is a :class:`ConfigError` naming the file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read {what} ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what} must be a mapping")
    return data
