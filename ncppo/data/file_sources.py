"""Sources read from files into one in-memory table: ``.json``/``.jsonl`` records (HPDv3's shape, or any
other, named by a column mapping) and folders of winner/loser images paired by file name (kohya's DPO
pull request). :mod:`ncppo.data.formats` presents them as Pick-a-Pic columns.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from ncppo.data.schema import DataError

CAPTION_SUFFIXES = (".caption", ".txt")  # kohya's default caption extension first
FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def content_uid(data: bytes) -> str:
    """An image's uid from its bytes, when the data has none: one image in several pairs is one image."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class _TableSource:
    """One in-memory table (one shard) with a label per row and row problems found while reading it."""

    table: pa.Table
    labels: list[str]
    problems: dict[str, np.ndarray]
    num_shards = 1

    def shard_name(self, i: int) -> str:
        return str(self.paths[0])

    def row_label(self, i: int, row: int) -> str:
        return self.labels[row]

    def row_problems(self, i: int) -> dict[str, np.ndarray]:
        return self.problems

    def schema(self, i: int) -> pa.Schema:
        return self.table.schema

    def metadata(self, i: int, columns: list[str]) -> pa.Table:
        return self.table.select([c for c in columns if c in self.table.column_names])

    def rows(self, i: int, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        return self.metadata(i, columns or self.table.column_names).take(pa.array(rows))


class JsonRecordsSource(_TableSource):
    """A ``.jsonl`` file (one JSON object per line; blank lines ignored) or a ``.json`` array of objects.

    A line that is not JSON, or not an object, is a row problem (counted, or an error with
    ``--on-bad-row error``) named by its line; a field whose type changes from one record to another is an
    error naming the line and the field.
    """

    def __init__(self, path: Path):
        self.path, self.paths = path, [path]
        records, self.labels, bad_json, not_object = [], [], [], []
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err})") from err
        if path.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError:
                    value, bad = {}, True
                else:
                    bad = False
                bad_json.append(bad)
                not_object.append(not bad and not isinstance(value, dict))
                records.append(value if isinstance(value, dict) else {})
                self.labels.append(f"line {number}")
        else:
            try:
                values = json.loads(text)
            except ValueError as err:
                raise DataError(f"{path}: not valid JSON ({err})") from err
            if not isinstance(values, list):
                raise DataError(f"{path}: a JSON array of records expected, found a {type(values).__name__} "
                                "(use .jsonl for one record per line)")
            for k, value in enumerate(values):
                bad_json.append(False)
                not_object.append(not isinstance(value, dict))
                records.append(value if isinstance(value, dict) else {})
                self.labels.append(f"item {k}")
        self.problems = {"not valid JSON": np.array(bad_json, bool),
                         "not a JSON object": np.array(not_object, bool)}
        self.table = self._table(records)

    def _table(self, records: list[dict]) -> pa.Table:
        keys = list(dict.fromkeys(k for r in records for k in r))
        columns = {}
        for key in keys:
            values = [r.get(key) for r in records]
            try:
                columns[key] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                first = next(type(v).__name__ for v in values if v is not None)
                odd = next(k for k, v in enumerate(values) if v is not None and type(v).__name__ != first)
                raise DataError(f"{self.path} {self.labels[odd]}: field {key!r} is {type(values[odd]).__name__} "
                                f"where earlier records have {first} ({err})") from err
        return pa.table(columns) if columns else pa.table({"_": pa.nulls(len(records))}).drop_columns(["_"])


def _subsets(root: Path) -> list[Path]:
    """``root`` itself when it holds ``w/`` and ``l/``, else its subfolders that do (kohya's ``1_name/``)."""
    has = lambda d: (d / "w").is_dir() and (d / "l").is_dir()  # noqa: E731
    if has(root):
        return [root]
    return sorted(d for d in root.iterdir() if d.is_dir() and has(d)) if root.is_dir() else []


def is_winner_loser_folder(path: Path) -> bool:
    return path.is_dir() and bool(_subsets(path))


class WinnerLoserFolderSource(_TableSource):
    """Folders of winner and loser images paired by file name (see the module docstring).

    A pair's images are its own files, so an image's uid is a digest of its bytes (every file is read once
    when the folder is opened): a copy of one image in two pairs is one image to the filter.
    """

    mapping = {"uid_0": "chosen_uid", "uid_1": "rejected_uid"}

    def __init__(self, root: Path):
        self.root, self.paths = root, [root]
        prompts, chosen, rejected, chosen_uid, rejected_uid, self.labels = [], [], [], [], [], []
        problem_rows: dict[str, list[int]] = {}
        for subset in _subsets(root):
            sides = {s: self._images(subset / s) for s in ("w", "l")}
            prefix = "" if subset == root else f"{subset.name}/"
            for stem in sorted(sides["w"].keys() | sides["l"].keys()):
                row = len(prompts)
                self.labels.append(f"pair {prefix}{stem}")
                w, lo = sides["w"].get(stem, []), sides["l"].get(stem, [])
                for side, found in (("winner (w/)", w), ("loser (l/)", lo)):
                    if not found:
                        problem_rows.setdefault(f"no {side} image of the same name", []).append(row)
                    elif len(found) > 1:
                        problem_rows.setdefault(f"two {side} images of one name", []).append(row)
                captions = [c for c in (self._caption(subset / s, stem) for s in ("w", "l")) if c is not None]
                if not captions:
                    problem_rows.setdefault("no caption file (NAME.caption or NAME.txt beside the image)",
                                            []).append(row)
                elif len(set(captions)) > 1:
                    problem_rows.setdefault("the winner's and the loser's captions differ", []).append(row)
                prompts.append(captions[0] if captions else None)
                for found, paths, uids in ((w, chosen, chosen_uid), (lo, rejected, rejected_uid)):
                    paths.append(str(found[0].relative_to(root)) if found else None)
                    uids.append(content_uid(found[0].read_bytes()) if found else None)
        if not prompts:
            raise DataError(f"{root}: no images in its w/ and l/ folders")
        n = len(prompts)
        self.problems = {reason: np.isin(np.arange(n), rows) for reason, rows in problem_rows.items()}
        self.table = pa.table({"prompt": pa.array(prompts, pa.string()), "chosen": pa.array(chosen, pa.string()),
                               "rejected": pa.array(rejected, pa.string()),
                               "chosen_uid": pa.array(chosen_uid, pa.string()),
                               "rejected_uid": pa.array(rejected_uid, pa.string())})

    @staticmethod
    def _images(folder: Path) -> dict[str, list[Path]]:
        out: dict[str, list[Path]] = {}
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix.lower() in FOLDER_IMAGE_SUFFIXES:
                out.setdefault(f.stem, []).append(f)
        return out

    @staticmethod
    def _caption(folder: Path, stem: str) -> str | None:
        for suffix in CAPTION_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return (folder / f"{stem}{suffix}").read_text(encoding="utf-8").strip()
        return None
