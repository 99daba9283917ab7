"""Prompt sets from local files: ``.txt`` (one a line), ``.csv``/``.tsv`` (a ``prompt``/``Prompt`` column, the
other columns kept as metadata, e.g. PartiPrompts' ``Category``) or ``.json`` (a list of strings, a list of
objects with a ``prompt`` key, or ``{"prompts": [...]}``). Errors name the file and the line or row."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from ncppo.errors import UsageError

PROMPT_COLUMNS = ("prompt", "Prompt", "caption", "text")


@dataclass
class PromptSet:
    """Prompts in file order, with one metadata dict per prompt (the file's other columns) and the file."""

    prompts: list[str]
    metadata: list[dict] = field(default_factory=list)  # one dict per prompt (the file's other columns)
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompts)

    def categories(self, key: str = "Category") -> list[str] | None:
        """The per-prompt value of ``key`` when every prompt has one (PartiPrompts' categories), else None."""
        values = [m.get(key) for m in self.metadata]
        return values if values and all(v not in (None, "") for v in values) else None


def _check(prompt, where: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError(f"{where}: empty or non-text prompt {prompt!r}")
    return prompt.strip()


def load_prompts(path: str | Path, limit: int | None = None) -> PromptSet:
    """The prompts of ``path`` in file order (``limit``: only the first ones)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    try:
        return _read_prompts(path, limit)
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text ({err})") from err


def _read_prompts(path: Path, limit: int | None) -> PromptSet:
    suffix = path.suffix.lower()
    prompts, metadata = [], []
    if suffix == ".txt":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():  # blank lines separate nothing: skipped, as every .txt prompt reader does
                prompts.append(_check(line, f"{path}:{number}"))
                metadata.append({})
    elif suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            column = next((c for c in PROMPT_COLUMNS if c in (reader.fieldnames or [])), None)
            if column is None:
                raise UsageError(f"{path}: no prompt column (expected one of {', '.join(PROMPT_COLUMNS)}; "
                                 f"found {reader.fieldnames})")
            for number, row in enumerate(reader, start=2):
                prompts.append(_check(row[column], f"{path}: row {number}, column {column!r}"))
                metadata.append({k: v for k, v in row.items() if k != column and k is not None})
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}: not valid JSON ({err})") from err
        items = data.get("prompts") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise UsageError(f"{path}: expected a list of prompts (or {{\"prompts\": [...]}})")
        for index, item in enumerate(items):
            where = f"{path}: item {index}"
            if isinstance(item, dict):
                key = next((c for c in PROMPT_COLUMNS if c in item), None)
                if key is None:
                    raise UsageError(f"{where}: no prompt key (expected one of {', '.join(PROMPT_COLUMNS)})")
                prompts.append(_check(item[key], where))
                metadata.append({k: v for k, v in item.items() if k != key})
            else:
                prompts.append(_check(item, where))
                metadata.append({})
    else:
        raise UsageError(f"{path}: unknown prompt file type {suffix!r} (expected .txt, .csv, .tsv or .json)")
    if not prompts:
        raise UsageError(f"{path}: no prompts")
    if limit is not None:
        prompts, metadata = prompts[:limit], metadata[:limit]
    return PromptSet(prompts, metadata, str(path))
