"""The option reference of :class:`~ncppo.training.config.TrainConfig` (``ncppo train --help``): every
key with its type, default, choices and meaning, read from the config dataclasses' docstrings (the one
place each option is documented)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing

from ncppo.training.config import _CHOICES, _REPORTERS, TrainConfig

_ENTRY = re.compile(r"^ {4}(\w+): (.*)$")


def field_docs(cls) -> dict[str, str]:
    """``{field: meaning}`` from a config dataclass's docstring: its ``name: meaning`` entries, indented four
    spaces under a section title (``Parameters:``, ``Run:``...), continued on more indented lines."""
    docs: dict[str, str] = {}
    current = None
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        if m := _ENTRY.match(line):
            current = m.group(1)
            docs[current] = m.group(2).strip()
        elif current and line.startswith(" " * 8):
            docs[current] += " " + line.strip()
        else:
            current = None
    return docs


def _rst(text: str) -> str:
    text = re.sub(r":(?:class|func|data|meth):`~?([\w.]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return text.replace("``", "")


def _hint_text(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_hint_text(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"list of {_hint_text(typing.get_args(hint)[0])}"
    return "null" if hint is type(None) else hint.__name__


def _value_text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, list):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_options() -> list[dict]:
    """Every config key of :class:`TrainConfig`, in order: ``{"key", "type", "default", "choices", "help"}``."""
    options = []

    def walk(cls, instance, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            value = getattr(instance, f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), value, f"{prefix}{f.name}.")
                continue
            key = f"{prefix}{f.name}"
            options.append({"key": key, "type": _hint_text(hints[f.name]), "default": value,
                            "choices": _CHOICES.get(key) or (_REPORTERS if key == "report_to" else None),
                            "help": _rst(docs.get(f.name, ""))})

    walk(TrainConfig, TrainConfig(), "")
    return options


def describe_options(width: int = 100) -> str:
    """The config keys with their type, default, choices and meaning: the epilog of ``ncppo train --help``."""
    import textwrap

    lines = ["config keys (a YAML file's sections mirror the dotted names; override any as KEY=VALUE):", ""]
    for option in config_options():
        head = f"  {option['key']} ({option['type']}, default: {_value_text(option['default'])})"
        if option["choices"]:
            head += f"  one of: {', '.join(map(str, option['choices']))}"
        lines.append(head)
        lines += textwrap.wrap(option["help"] or "(undocumented)", width, initial_indent=" " * 6,
                               subsequent_indent=" " * 6, break_on_hyphens=False)
    return "\n".join(lines)
