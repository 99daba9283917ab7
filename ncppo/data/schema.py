"""The Pick-a-Pic v2 schema, label rules, and how bad input is reported.

A Pick-a-Pic v2 row is one comparison: ``caption``, two images (``jpg_0``, ``jpg_1`` as JPEG bytes, with
``image_0_uid``, ``image_1_uid``), labels ``label_0``/``label_1`` in {(1, 0), (0, 1), (0.5, 0.5)}, and
``created_at``, ``user_id``, ``ranking_id``, ``model_0``, ``model_1``, ... Everything here reads only
metadata columns: image bytes are never needed to validate or filter.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ncppo.errors import NcppoError, UsageError

IMAGE_COLUMNS = ("jpg_0", "jpg_1")
REQUIRED_COLUMNS = ("caption", "label_0", "label_1", "image_0_uid", "image_1_uid")
OPTIONAL_METADATA = ("created_at", "user_id", "ranking_id", "model_0", "model_1")
TIE_POLICIES = ("drop", "keep", "error")
BAD_ROW_POLICIES = ("skip", "error")


class DataError(NcppoError, ValueError):
    """Bad input, with where it is: source file or shard, row, column."""


@dataclass
class SkipReport:
    """Rows or images left out, counted by reason, with the first few locations of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, locations: list[str], count: int | None = None) -> None:
        n = len(locations) if count is None else count
        if n == 0:
            return
        self.counts[reason] += n
        kept = self.examples.setdefault(reason, [])
        kept.extend(locations[: self.max_examples - len(kept)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": self.examples}

    def summary(self) -> str:
        if not self.total:
            return "no rows skipped"
        parts = [f"{n} {reason} (e.g. {', '.join(self.examples.get(reason, []))})" for reason, n in self.counts.items()]
        return f"skipped {self.total}: " + "; ".join(parts)


def check_columns(schema: pa.Schema, where: str, needed=REQUIRED_COLUMNS) -> None:
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(repr(c) for c in missing)} "
                        f"(Pick-a-Pic v2 schema needs {', '.join(needed)})")


_STRING_FIELDS = ("caption", "uid_w", "uid_l")


@dataclass
class NormalizedPairs:
    """Metadata of valid comparisons, winner first: one entry per kept source row.

    Strings stay Arrow arrays (no Python objects per row: Pick-a-Pic has ~1M rows); numbers are numpy.
    """

    caption: pa.ChunkedArray  # string, one chunk per source shard (no concatenating copy)
    uid_w: pa.ChunkedArray  # string
    uid_l: pa.ChunkedArray
    is_tie: np.ndarray  # bool
    swapped: np.ndarray  # bool: the winner is image_1
    created_at: np.ndarray  # int64 (ns since epoch; -1 when unknown)
    user_id: np.ndarray  # int64 (-1 when unknown)
    shard: np.ndarray  # int32: which source shard
    row: np.ndarray  # int64: row within the shard

    def __len__(self) -> int:
        return len(self.is_tie)

    def take(self, index: np.ndarray) -> NormalizedPairs:
        index = np.asarray(index, dtype=np.int64)
        return NormalizedPairs(**{
            k: getattr(self, k).take(pa.array(index)) if k in _STRING_FIELDS else getattr(self, k)[index]
            for k in self.__dataclass_fields__})

    @staticmethod
    def concat(parts: list[NormalizedPairs]) -> NormalizedPairs:
        if not parts:
            ints = np.array([], dtype=np.int64)
            empty = pa.chunked_array([], pa.string())
            return NormalizedPairs(empty, empty, empty, np.array([], bool), np.array([], bool), ints, ints,
                                   np.array([], np.int32), ints)
        return NormalizedPairs(**{
            k: pa.chunked_array([c for p in parts for c in getattr(p, k).chunks], pa.string()) if k in _STRING_FIELDS
            else np.concatenate([getattr(p, k) for p in parts])
            for k in NormalizedPairs.__dataclass_fields__})


def _int_column(table: pa.Table, name: str) -> np.ndarray:
    n = table.num_rows
    if name not in table.column_names:
        return np.full(n, -1, dtype=np.int64)
    col = table.column(name)
    if pa.types.is_date(col.type):
        col = pc.cast(col, pa.timestamp("ns"))
    if pa.types.is_timestamp(col.type):
        col = pc.cast(pc.cast(col, pa.timestamp("ns")), pa.int64())
    elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = pc.cast(pc.strptime(col, format="%Y-%m-%d %H:%M:%S", unit="ns", error_is_null=True), pa.int64())
    return np.asarray(pc.fill_null(pc.cast(col, pa.int64()), -1).to_numpy(zero_copy_only=False), dtype=np.int64)


def _strings(table: pa.Table, name: str) -> pa.Array:
    return pc.cast(table.column(name), pa.string()).combine_chunks()


def _floats(table: pa.Table, name: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The column as floats (NaN where null) and a mask of the values that are not numbers (e.g. ``"yes"``)."""
    column = table.column(name)
    n = table.num_rows
    try:
        col = pc.fill_null(pc.cast(column, pa.float64()), np.nan)
        return np.asarray(col.to_numpy(zero_copy_only=False)), np.zeros(n, dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    values, not_number = np.full(n, np.nan), np.zeros(n, dtype=bool)
    for k, value in enumerate(column.to_pylist()):  # only when the cast failed: find the values that are not numbers
        if value is None:
            continue
        try:
            values[k] = float(value)
        except (TypeError, ValueError):
            not_number[k] = True
    if not_number.all():
        raise DataError(f"{where}: column {name!r} holds no numbers (row 0 is {column[0].as_py()!r}); labels must be "
                        "0, 0.5 or 1 (Pick-a-Pic v2 schema): convert the column")
    return values, not_number


def _mask(array) -> np.ndarray:
    return np.asarray(pc.fill_null(array, True).to_numpy(zero_copy_only=False), dtype=bool)


def normalize(table: pa.Table, shard: int, where: str, tie_policy: str, skips: SkipReport,
              on_bad_row: str = "skip", row_offset: int = 0, problems: dict[str, np.ndarray] | None = None,
              row_label=None) -> NormalizedPairs:
    """Validate one shard's metadata and put the winner first. Bad rows are counted in ``skips`` or raise.

    ``problems`` are the source's own findings (reason -> mask over the rows: a line that is not JSON, an
    image file that is not there), checked first; ``row_label(row)`` names a row (default ``row N``).
    """
    label = row_label or (lambda r: f"row {r}")
    if tie_policy not in TIE_POLICIES:
        raise UsageError(f"unknown tie policy {tie_policy!r}; expected one of {TIE_POLICIES}")
    check_columns(table.schema, where)
    n = table.num_rows
    rows = np.arange(row_offset, row_offset + n, dtype=np.int64)
    (l0, text0), (l1, text1) = _floats(table, "label_0", where), _floats(table, "label_1", where)
    caption = _strings(table, "caption")
    uid0, uid1 = _strings(table, "image_0_uid"), _strings(table, "image_1_uid")

    win1 = (l0 == 0) & (l1 == 1)
    tie = (l0 == 0.5) & (l1 == 0.5)
    missing_uid = _mask(pc.or_kleene(pc.equal(uid0, ""), pc.equal(uid1, "")))
    bad = {
        **(problems or {}),
        "label not a number (columns label_0/label_1)": text0 | text1,
        "labels not in {0, 0.5, 1} or not summing to 1 (columns label_0/label_1)": ~(
            ((l0 == 1) & (l1 == 0)) | win1 | tie),
        "empty caption (column caption)": _mask(pc.equal(pc.utf8_trim_whitespace(caption), "")),
        "missing image uid (columns image_0_uid/image_1_uid)": missing_uid,
        "a pair of one image with itself (image_0_uid == image_1_uid)": _mask(pc.equal(uid0, uid1)) & ~missing_uid,
    }
    invalid = np.zeros(n, dtype=bool)
    for reason, mask in bad.items():
        mask = mask & ~invalid  # count each row once, under its first reason
        if mask.any():
            locations = [f"{where} {label(int(r))}" for r in rows[mask][:5]]
            if on_bad_row == "error":
                raise DataError(f"{locations[0]}: {reason}; fix the row, or skip such rows (--on-bad-row skip)")
            skips.add(reason, locations, int(mask.sum()))
        invalid |= mask
    if tie_policy == "error" and (tie & ~invalid).any():
        first = rows[tie & ~invalid][0]
        raise DataError(f"{where} {label(int(first))}: a tie (label_0 = label_1 = 0.5) with tie policy 'error'")
    keep = ~invalid & ~tie if tie_policy == "drop" else ~invalid
    if tie_policy == "drop":
        skips.add("tie dropped (tie policy 'drop')", [], int((tie & ~invalid).sum()))
    keep_idx = None if keep.all() else pa.array(np.nonzero(keep)[0])  # the common case: no copy
    kept = (lambda a: a) if keep_idx is None else (lambda a: a.take(keep_idx))
    swapped = pa.array(win1)
    chunked = lambda a: pa.chunked_array([a], pa.string())  # noqa: E731
    return NormalizedPairs(
        caption=chunked(kept(caption)),
        uid_w=chunked(kept(pc.if_else(swapped, uid1, uid0))),
        uid_l=chunked(kept(pc.if_else(swapped, uid0, uid1))),
        is_tie=tie[keep],
        swapped=win1[keep],
        created_at=_int_column(table, "created_at")[keep],
        user_id=_int_column(table, "user_id")[keep],
        shard=np.full(int(keep.sum()), shard, dtype=np.int32),
        row=rows[keep],
    )
