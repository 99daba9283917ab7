"""Prompt sets: the standard ones by name, or local files.

Names (:data:`PROMPT_SETS`, shipped in ``ncppo/evaluation/prompt_sets/``, sources and licences in its
``SOURCES.md``): ``partiprompts`` (PartiPrompts, 1632, with ``Category`` and ``Challenge``), ``pickapic``
(the 500 unique Pick-a-Pic v2 validation prompts, the paper's), ``hpdv2`` (the HPDv2 benchmark's 3200
test prompts; ``Category`` is the style: 800 each of anime, concept-art, paintings, photo, in that order).

Files: ``.txt`` (one a line), ``.csv``/``.tsv`` (a ``prompt``/``Prompt`` column, the other columns kept as
metadata, e.g. PartiPrompts' ``Category``), ``.json`` (a list of strings, a list of objects with a
``prompt`` key, or ``{"prompts": [...]}``) or ``.jsonl`` (one string or object a line). Errors name the
file and the line or row. A path that exists is always read as a file, before any name.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from ncppo.errors import UsageError

PROMPT_COLUMNS = ("prompt", "Prompt", "caption", "text")
PROMPT_SETS = {"partiprompts": "PartiPrompts.tsv", "pickapic": "pickapic_v2_validation_unique.csv",
               "hpdv2": "hpdv2_benchmark.txt"}
"""The packaged prompt sets: name -> file in ``ncppo/evaluation/prompt_sets/``."""
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")  # 800 prompts each, in this order
SUFFIXES = (".txt", ".csv", ".tsv", ".json", ".jsonl")


def prompt_set_path(name: str) -> Path:
    """The packaged file of the prompt set called ``name`` (one of :data:`PROMPT_SETS`)."""
    from ncppo.configuration import did_you_mean

    if name not in PROMPT_SETS:
        raise UsageError(f"unknown prompt set {name!r}{did_you_mean(name, PROMPT_SETS)} "
                         f"(packaged: {', '.join(PROMPT_SETS)}; or give a prompt file)")
    return Path(__file__).parent / "prompt_sets" / PROMPT_SETS[name]


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
    """The prompts of the file ``path``, or of the packaged set of that name (:data:`PROMPT_SETS`), in order
    (``limit``: only the first ones). A named set's ``source`` is its name, the same on every install."""
    name = str(path)
    if not Path(path).exists() and name in PROMPT_SETS:
        found = _read_prompts(prompt_set_path(name), limit)
        if name == "hpdv2":
            found.metadata = [{**m, "Category": HPDV2_STYLES[i // 800]} for i, m in enumerate(found.metadata)]
        found.source = name
        return found
    path = Path(path)
    if not path.is_file():
        from ncppo.configuration import did_you_mean

        if path.suffix.lower() not in SUFFIXES and path.parent == Path("."):
            raise FileNotFoundError(f"prompt file {path} does not exist, and {name!r} is no packaged prompt set"
                                    f"{did_you_mean(name, PROMPT_SETS)} (packaged: {', '.join(PROMPT_SETS)})")
        raise FileNotFoundError(f"prompt file {path} does not exist")
    try:
        return _read_prompts(path, limit)
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text ({err})") from err


def _from_item(item, where: str, prompts: list, metadata: list) -> None:
    if isinstance(item, dict):
        key = next((c for c in PROMPT_COLUMNS if c in item), None)
        if key is None:
            raise UsageError(f"{where}: no prompt key (expected one of {', '.join(PROMPT_COLUMNS)})")
        prompts.append(_check(item[key], where))
        metadata.append({k: v for k, v in item.items() if k != key})
    else:
        prompts.append(_check(item, where))
        metadata.append({})


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
            _from_item(item, f"{path}: item {index}", prompts, metadata)
    elif suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{path}:{number}: not valid JSON ({err})") from err
            _from_item(item, f"{path}:{number}", prompts, metadata)
    else:
        raise UsageError(f"{path}: unknown prompt file type {suffix!r} (expected {', '.join(SUFFIXES)}, or a packaged "
                         f"set: {', '.join(PROMPT_SETS)})")
    if not prompts:
        raise UsageError(f"{path}: no prompts")
    if limit is not None:
        prompts, metadata = prompts[:limit], metadata[:limit]
    return PromptSet(prompts, metadata, str(path))
