"""Preference data in the shapes people have, presented to the readers as Pick-a-Pic v2 columns.

Every shape goes through the same validation, skip report, filter and cache: an adapter
(:class:`MappedSource`) renames the source's columns to ``caption``, ``label_0``/``label_1``,
``image_0_uid``/``image_1_uid`` and ``jpg_0``/``jpg_1``, and the readers see a Pick-a-Pic source.

Shapes, told apart by their column names (a :class:`ColumnMapping` overrides or completes them):

- **Pick-a-Pic v2**: ``caption``, ``jpg_0``/``jpg_1``, ``label_0``/``label_1``, ``image_0_uid``/``image_1_uid``.
- **TRL / HF preference**: ``prompt``, ``chosen``, ``rejected``; the chosen image won.
- **HPDv3** (MizzenAI/HPDv3's ``train.json``, ``test.json``, ``all.json``): a JSON array, or JSONL, of
  ``{"prompt", "path1", "path2", "model1", "model2", "choice_dist", "confidence"}``, ``path1`` the preferred
  image (their README: "path1's image is always the preferred one"). Other fields are carried along.
- **Winner/loser folders** (kohya sd-scripts' DPO pull request #1427): ``DIR/w/NAME.png`` beat
  ``DIR/l/NAME.png``, with the caption in ``NAME.caption`` or ``NAME.txt`` beside either image;
  also one level of subsets (``DIR/1_name/w``, ``DIR/1_name/l``, as kohya's dreambooth folders).

Images may be bytes, ``datasets`` Image structs (``{"bytes", "path"}``) or file paths. A relative path is
resolved against ``image_root`` (``--image-dir``; by default the folder of the JSON/CSV/parquet file, or the
dataset folder). Without uid columns, an image's uid is its path as written (normalised), or, for embedded
bytes, a digest of the bytes: that reads the image columns once when the source is opened, so that the
filter still recognises one image in several pairs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ncppo.data.file_sources import content_uid
from ncppo.data.schema import IMAGE_COLUMNS, REQUIRED_COLUMNS, DataError


@dataclass(frozen=True)
class ColumnMapping:
    """Which source column plays which part (``--caption-column`` and the like, as diffusers' scripts have).

    Parameters:
        caption: the prompt column.
        image_0: the first image (with ``label_0``), Pick-a-Pic style.
        image_1: the second image (with ``label_1``).
        label_0: the first image's label (1 won, 0 lost, 0.5 tie).
        label_1: the second image's label.
        uid_0: the first image's id (default: derived from its path or bytes).
        uid_1: the second image's id.
        chosen: the winning image, winner first (TRL style; no label columns).
        rejected: the losing image.
    """

    caption: str | None = None
    image_0: str | None = None
    image_1: str | None = None
    label_0: str | None = None
    label_1: str | None = None
    uid_0: str | None = None
    uid_1: str | None = None
    chosen: str | None = None
    rejected: str | None = None

    def given(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}

    @staticmethod
    def option(role: str) -> str:
        return f"--{role.replace('_', '-')}-column"


PICKAPIC = {"caption": "caption", "image_0": "jpg_0", "image_1": "jpg_1", "label_0": "label_0",
            "label_1": "label_1", "uid_0": "image_0_uid", "uid_1": "image_1_uid"}
TRL = {"caption": "prompt", "chosen": "chosen", "rejected": "rejected"}
HPDV3 = {"caption": "prompt", "chosen": "path1", "rejected": "path2"}
SHAPES = {"Pick-a-Pic v2": PICKAPIC, "TRL (prompt/chosen/rejected)": TRL, "HPDv3 (prompt/path1/path2)": HPDV3}
RENAMES = {"model1": "model_0", "model2": "model_1"}  # HPDv3's names for Pick-a-Pic's metadata columns


def _detect(names: set[str]) -> dict[str, str] | None:
    if names & {"label_0", "jpg_0", "image_0_uid"}:
        return PICKAPIC
    if {"chosen", "rejected"} <= names:
        return TRL
    if {"path1", "path2"} <= names:
        return HPDV3
    return None


def resolve_roles(names: list[str], mapping: ColumnMapping | None, where: str) -> dict[str, str] | None:
    """The role -> column map for a source with columns ``names``; None when it is plain Pick-a-Pic."""
    given = mapping.given() if mapping else {}
    shape = _detect(set(names))
    if not given and shape is PICKAPIC:
        return None
    if given.keys() & {"chosen", "rejected"}:
        base = dict(TRL)
    elif given.keys() & {"image_0", "image_1", "label_0", "label_1"}:
        base = dict(PICKAPIC)
    elif shape is None:
        known = "; ".join(f"{name}: {', '.join(cols.values())}" for name, cols in SHAPES.items())
        missing = [c for c in REQUIRED_COLUMNS + IMAGE_COLUMNS if c not in names]
        raise DataError(f"{where}: missing column(s) {', '.join(repr(c) for c in missing)}: the columns "
                        f"({', '.join(names) or 'none'}) match no known shape ({known}); name yours with "
                        "--caption-column, --chosen-column/--rejected-column or --image-0-column/--label-0-column ...")
    else:
        base = dict(shape)
    base.update(given)
    if "chosen" in base:
        for role in ("image_0", "image_1", "label_0", "label_1", "uid_0", "uid_1"):
            if role not in given:
                base.pop(role, None)
    absent = [(role, col) for role, col in base.items() if col not in names
              and not (role.startswith("uid") and role not in given)]
    if absent:
        named = ", ".join(f"{col!r} (given as {ColumnMapping.option(role)})" if role in given else
                          f"{col!r} (the {role} column; {ColumnMapping.option(role)} names another)"
                          for role, col in absent)
        raise DataError(f"{where}: missing column(s) {named}; the columns are {', '.join(names)}")
    for role in ("uid_0", "uid_1"):  # derived from the images when the source has none
        if role in base and base[role] not in names:
            del base[role]
    return base


class MappedSource:
    """Any table source seen through a role -> column map (see the module docstring)."""

    def __init__(self, inner, roles: dict[str, str], image_root: Path | None):
        self.inner, self.roles, self.image_root = inner, roles, image_root
        self.paths = list(inner.paths)
        self.num_shards = inner.num_shards
        self.images = (roles["chosen"], roles["rejected"]) if "chosen" in roles else (roles["image_0"], roles["image_1"])
        self.labels = (roles["label_0"], roles["label_1"]) if "label_0" in roles else None
        self.uids = (roles["uid_0"], roles["uid_1"]) if "uid_0" in roles else None
        self._meta: dict[int, pa.Table] = {}
        self._problems: dict[int, dict[str, np.ndarray]] = {}

    def shard_name(self, i: int) -> str:
        return self.inner.shard_name(i)

    def row_label(self, i: int, row: int) -> str:
        label = getattr(self.inner, "row_label", None)
        return label(i, row) if label else f"row {row}"

    def _carried(self, i: int) -> dict[str, str]:
        """Output column -> source column of everything else the source has (HPDv3's ``model1`` as
        ``model_0``; other columns under their own names), for the filter's output."""
        names = self.inner.schema(i).names
        used = set(self.roles.values()) | {"created_at", "user_id", "ranking_id"}
        out = {new: old for old, new in RENAMES.items() if old in names}
        for name in names:
            if name not in used and name not in RENAMES and name not in out and name not in CORE_NAMES:
                out[name] = name
        return out

    def schema(self, i: int) -> pa.Schema:
        inner = self.inner.schema(i)
        extra = [inner.field(c) for c in ("created_at", "user_id", "ranking_id")
                 if c in inner.names and c not in self.roles.values()]
        carried = [pa.field(new, inner.field(old).type) for new, old in self._carried(i).items()]
        return pa.schema(list(CORE_SCHEMA) + extra + carried)

    # -- reading ---------------------------------------------------------------------------------
    def _image_parts(self, column, name: str, where: str) -> tuple[list, list]:
        """(bytes or None, path or None) per row, from bytes, Image structs or path strings."""
        kind = column.type
        n = len(column)
        if pa.types.is_struct(kind):
            names = [kind.field(k).name for k in range(kind.num_fields)]
            data = pc.struct_field(column, "bytes").to_pylist() if "bytes" in names else [None] * n
            paths = pc.struct_field(column, "path").to_pylist() if "path" in names else [None] * n
            return data, paths
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return column.to_pylist(), [None] * n
        if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind):
            return [None] * n, column.to_pylist()
        raise DataError(f"{where}: column {name!r} holds {kind}: expected image bytes, a datasets Image or a "
                        "file path")

    def _resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() or self.image_root is None else self.image_root / p

    def _caption(self, table: pa.Table, where: str) -> pa.Array:
        column = table.column(self.roles["caption"])
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
                or pa.types.is_null(column.type)):
            raise DataError(f"{where}: column {self.roles['caption']!r} holds {column.type}, not text (a "
                            "conversational prompt?); name a text column with --caption-column")
        return pc.cast(column, pa.string()).combine_chunks()

    def _metadata(self, i: int) -> pa.Table:
        """The shard's core metadata columns (uids derived here, once), and its row problems."""
        if i in self._meta:
            return self._meta[i]
        where = self.shard_name(i)
        names = self.inner.schema(i).names
        table = self.inner.metadata(i, list(dict.fromkeys([
            self.roles["caption"], *self.images, *(self.labels or ()), *(self.uids or ()),
            *(c for c in ("created_at", "user_id", "ranking_id") if c in names and c not in self.roles.values())])))
        n = table.num_rows
        problems: dict[str, np.ndarray] = dict(getattr(self.inner, "row_problems", lambda i: {})(i))
        derived_uids = []
        for column in self.images:
            if column not in table.column_names:  # made from the uids by the source (the authors' CSV)
                continue
            data, paths = self._image_parts(table.column(column), column, where)
            missing, not_found, uids = np.zeros(n, bool), np.zeros(n, bool), []
            for k, (b, p) in enumerate(zip(data, paths)):
                if b:
                    uids.append(content_uid(b))
                elif p:
                    uids.append(os.path.normpath(p))
                    not_found[k] = not self._resolve(p).is_file()
                else:
                    uids.append(None)
                    missing[k] = True
            problems[f"no image (column {column!r} is empty)"] = missing
            problems[f"image file not found (column {column!r})"] = not_found
            derived_uids.append(pa.array(uids, pa.string()))
            del data
        if self.uids is not None:
            uid_columns = [table.column(c) for c in self.uids]
        elif len(derived_uids) == 2:
            uid_columns = derived_uids
        else:
            raise DataError(f"{where}: images come from uids here: name the uid columns (--uid-0-column, "
                            "--uid-1-column)")
        labels = ([table.column(c) for c in self.labels] if self.labels is not None
                  else [pa.array(np.ones(n)), pa.array(np.zeros(n))])
        core = {"caption": self._caption(table, where), "label_0": labels[0], "label_1": labels[1],
                "image_0_uid": pc.cast(uid_columns[0], pa.string()), "image_1_uid": pc.cast(uid_columns[1], pa.string())}
        for name in ("created_at", "user_id", "ranking_id"):
            if name in names and name not in self.roles.values():
                core[name] = table.column(name)
        self._problems[i] = {reason: mask for reason, mask in problems.items() if mask.any()}
        self._meta[i] = pa.table(core)
        return self._meta[i]

    def row_problems(self, i: int) -> dict[str, np.ndarray]:
        self._metadata(i)
        return self._problems[i]

    def metadata(self, i: int, columns: list[str]) -> pa.Table:
        table = self._metadata(i)
        return table.select([c for c in columns if c in table.column_names])

    def _read_image(self, data: bytes | None, path: str | None) -> bytes | None:
        if data:
            return data
        if path:
            try:
                return self._resolve(path).read_bytes()
            except OSError:
                return None  # a missing file decodes as a bad image (and was counted as a row problem)
        return None

    def rows(self, i: int, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        schema = self.schema(i)
        wanted = [c for c in (columns or schema.names) if c in schema.names]
        rows = np.asarray(rows, dtype=np.int64)
        meta = self._metadata(i).take(pa.array(rows))
        carried = self._carried(i)
        source_cols = [carried[c] for c in wanted if c in carried]
        source_cols += [self.images[int(c[-1])] for c in wanted if c in IMAGE_COLUMNS]
        source = self.inner.rows(i, rows, list(dict.fromkeys(source_cols))) if source_cols else None
        out = {}
        for name in wanted:
            if name in meta.column_names:
                out[name] = meta.column(name)
            elif name in IMAGE_COLUMNS:
                data, paths = self._image_parts(source.column(self.images[int(name[-1])]), name, self.shard_name(i))
                out[name] = pa.array([self._read_image(b, p) for b, p in zip(data, paths)], pa.binary())
            else:
                out[name] = source.column(carried[name])
        return pa.table(out).cast(pa.schema([schema.field(n) for n in out]))


CORE_SCHEMA = pa.schema([("caption", pa.string()), ("label_0", pa.float64()), ("label_1", pa.float64()),
                         ("image_0_uid", pa.string()), ("image_1_uid", pa.string()),
                         ("jpg_0", pa.binary()), ("jpg_1", pa.binary())])
CORE_NAMES = set(CORE_SCHEMA.names)


def adapt(source, mapping: ColumnMapping | None, image_root: Path | None):
    """``source`` as Pick-a-Pic columns: itself when it already is, else a :class:`MappedSource`."""
    own = getattr(source, "mapping", None)  # a source's own columns for some roles (the folders' digests)
    if own:
        mapping = ColumnMapping(**{**own, **(mapping.given() if mapping else {})})
    roles = None
    for i in range(source.num_shards):
        shard_roles = resolve_roles(source.schema(i).names, mapping, source.shard_name(i))
        if i and shard_roles != roles:
            raise DataError(f"{source.shard_name(i)}: its columns differ in shape from {source.shard_name(0)}'s")
        roles = shard_roles
    return source if roles is None else MappedSource(source, roles, image_root)
