"""Where preference pairs live: parquet shards, a ``save_to_disk`` folder, a hub dataset, the
authors' layout (a CSV of uids/labels/captions plus a folder of images named ``{uid}.jpg``), a ``.json``
or ``.jsonl`` of records, or folders of winner/loser images (the last two in
:mod:`ncppo.data.file_sources`); :mod:`ncppo.data.formats` adapts every source not in the Pick-a-Pic shape.

Every source is a list of shards with two ways in: ``metadata(i)`` reads a shard's metadata columns
only (parquet and arrow are columnar, so image bytes are not even read), and ``rows(i, rows, columns)``
reads chosen rows, images included, when a batch or a writer needs them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ncppo.data.schema import IMAGE_COLUMNS, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
LEFTOVER_PREFIXES = (".tmp-", ".new-", ".old-")  # unfinished or superseded writes (ncppo.io), never data


def _damaged(path, err: Exception, what: str) -> DataError:
    detail = " ".join(str(err).split())  # pyarrow's messages span lines
    return DataError(f"{path}: cannot read {what} ({type(err).__name__}: {detail}); the file is damaged: "
                     "replace it with a good copy (or move it out of the folder)")


class ParquetSource:
    """A parquet file, or a folder of ``*.parquet`` shards (searched recursively, in name order)."""

    def __init__(self, path: Path):
        self.path = path
        self.paths = [path]  # what a writer must not write into or over
        if path.is_file():
            self.files = [path]
        else:  # leftovers inside the folder are skipped (the folder's own name may be anything)
            self.files = [f for f in sorted(path.rglob("*.parquet"))
                          if not any(part.startswith(LEFTOVER_PREFIXES) for part in f.relative_to(path).parts)]
        if not self.files:
            raise DataError(f"{path}: no parquet files found")
        self._handles: dict[int, pq.ParquetFile] = {}
        self._group_starts: dict[int, np.ndarray] = {}

    @property
    def num_shards(self) -> int:
        return len(self.files)

    def shard_name(self, i: int) -> str:
        return str(self.files[i])

    def _file(self, i: int) -> pq.ParquetFile:
        if i not in self._handles:
            try:
                self._handles[i] = pq.ParquetFile(self.files[i])
            except Exception as err:
                raise DataError(f"{self.files[i]}: not a readable parquet file ({err})") from err
        return self._handles[i]

    def schema(self, i: int) -> pa.Schema:
        return self._file(i).schema_arrow

    def metadata(self, i: int, columns: list[str]) -> pa.Table:
        available = self.schema(i).names
        columns = [c for c in columns if c in available]
        try:
            return self._file(i).read(columns=columns)
        except (pa.ArrowException, OSError) as err:
            raise _damaged(self.files[i], err, self._bad_groups(i, columns)) from err

    def _bad_groups(self, i: int, columns: list[str] | None, groups=None) -> str:
        """Which row group (and rows) fails to read: named in the error, so the damage can be located."""
        f, start = self._file(i), 0
        for g in range(f.num_row_groups):
            n = f.metadata.row_group(g).num_rows
            if groups is None or g in groups:
                try:
                    f.read_row_group(g, columns=columns)
                except (pa.ArrowException, OSError):
                    bad = [c for c in (columns or self.schema(i).names) if not self._readable(f, g, c)]
                    return f"row group {g} (rows {start}-{start + n - 1}), column(s) {', '.join(bad) or 'all'}"
            start += n
        return f"columns {', '.join(columns or ['all'])}"

    @staticmethod
    def _readable(f: pq.ParquetFile, group: int, column: str) -> bool:
        try:
            f.read_row_group(group, columns=[column])
            return True
        except (pa.ArrowException, OSError):
            return False

    def rows(self, i: int, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """Rows by index, reading only the row groups that hold them."""
        f = self._file(i)
        if i not in self._group_starts:  # read for every batch: compute once per file
            self._group_starts[i] = np.cumsum([0] + [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)])
        starts = self._group_starts[i]
        groups = np.unique(np.searchsorted(starts, rows, side="right") - 1)
        try:
            table = f.read_row_groups(list(groups), columns=columns)
        except (pa.ArrowException, OSError) as err:
            raise _damaged(self.files[i], err, self._bad_groups(i, columns, set(groups.tolist()))) from err
        offsets = np.concatenate([[0], np.cumsum([starts[g + 1] - starts[g] for g in groups])])
        local = np.empty(len(rows), dtype=np.int64)
        for k, g in enumerate(groups):
            in_group = (rows >= starts[g]) & (rows < starts[g + 1])
            local[in_group] = rows[in_group] - starts[g] + offsets[k]
        return table.take(pa.array(local))


class ArrowDatasetSource:
    """A ``datasets.Dataset`` (from ``save_to_disk`` or the hub): one shard, memory-mapped arrow."""

    def __init__(self, dataset, name: str, path: Path | None = None):
        if dataset._indices is not None:  # a selected/shuffled view: materialise it once
            dataset = dataset.flatten_indices()
        self.dataset = dataset
        self.name = name
        self.paths = [path] if path is not None else []

    num_shards = 1

    def shard_name(self, i: int) -> str:
        return self.name

    def schema(self, i: int) -> pa.Schema:
        return self.dataset.data.table.schema

    def metadata(self, i: int, columns: list[str]) -> pa.Table:
        table = self.dataset.data.table  # memory-mapped: selecting columns touches no image bytes
        return table.select([c for c in columns if c in table.column_names])

    def rows(self, i: int, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        table = self.metadata(i, columns or self.schema(i).names)
        return table.take(pa.array(rows))


class CsvImageFolderSource:
    """The authors' layout: a CSV with ``caption, image_0_uid, image_1_uid, label_0, label_1`` (and
    optionally ``created_at``, ``user_id``, ...) plus a folder of images named ``{uid}.jpg`` (or .png/.webp)."""

    def __init__(self, csv_path: Path, image_dir: Path, uid_columns: tuple[str, str] = ("image_0_uid", "image_1_uid")):
        import pyarrow.csv as pacsv

        self.csv_path, self.image_dir, self.uid_columns = csv_path, image_dir, uid_columns
        self.paths = [csv_path, image_dir]
        try:
            self.table = pacsv.read_csv(csv_path, convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in (*uid_columns, "caption")}))
        except Exception as err:
            raise DataError(f"{csv_path}: not a readable CSV ({err})") from err
        self.by_uid = all(c in self.table.column_names for c in uid_columns)  # else: paths, as another shape
        if self.by_uid and not image_dir.is_dir():
            raise DataError(f"{image_dir}: image folder not found (expected beside {csv_path.name})")

    num_shards = 1

    def shard_name(self, i: int) -> str:
        return str(self.csv_path)

    def schema(self, i: int) -> pa.Schema:
        made = [pa.field(c, pa.binary()) for c in IMAGE_COLUMNS] if self.by_uid else []
        return pa.schema(list(self.table.schema) + made)

    def metadata(self, i: int, columns: list[str]) -> pa.Table:
        return self.table.select([c for c in columns if c in self.table.column_names])

    def image_path(self, uid: str) -> Path | None:
        for suffix in IMAGE_SUFFIXES:
            path = self.image_dir / f"{uid}{suffix}"
            if path.is_file():
                return path
        return None

    def rows(self, i: int, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        table = self.table.take(pa.array(rows))
        wanted = columns or self.schema(i).names
        out = table.select([c for c in wanted if c in table.column_names])
        for side in (0, 1):
            column = f"jpg_{side}"
            if column not in wanted or not self.by_uid:
                continue
            images = []
            for uid in table.column(self.uid_columns[side]).to_pylist():
                path = self.image_path(uid)
                images.append(path.read_bytes() if path is not None else None)  # a missing file decodes as bad
            out = out.append_column(column, pa.array(images, type=pa.binary()))
        return out


def open_source(source: str | os.PathLike, *, split: str = "train", image_dir: str | os.PathLike | None = None,
                columns=None):
    """Open a preference-pair source by path (or hub id, when online), in any shape that
    :mod:`ncppo.data.formats` knows, ``columns`` (a ``ColumnMapping``) naming the columns of others.
    Relative image paths are resolved against ``image_dir``, by default the file's folder or the folder."""
    from ncppo.data.file_sources import JsonRecordsSource, WinnerLoserFolderSource, is_winner_loser_folder
    from ncppo.data.formats import adapt

    path = Path(source).expanduser()
    if not path.exists():
        return adapt(_load_from_hub(str(source), split), columns, Path(image_dir) if image_dir else None)
    root = Path(image_dir) if image_dir else (path.parent if path.is_file() else path)
    uids = (getattr(columns, "uid_0", None) or "image_0_uid", getattr(columns, "uid_1", None) or "image_1_uid")
    if path.is_file() and path.suffix == ".csv":
        opened = CsvImageFolderSource(path, Path(image_dir) if image_dir else path.parent / "images", uids)
    elif path.is_file() and path.suffix == ".parquet":
        opened = ParquetSource(path)
    elif path.is_file() and path.suffix in (".json", ".jsonl"):
        opened = JsonRecordsSource(path)
    elif path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                            or (path / "state.json").is_file()):
        opened = _load_from_disk(path, split)
    elif path.is_dir() and not any(path.rglob("*.parquet")) and is_winner_loser_folder(path):
        opened = WinnerLoserFolderSource(path)
    elif path.is_dir():
        csvs = sorted(path.glob("*.csv"))
        if not any(path.rglob("*.parquet")) and len(csvs) == 1:
            opened = CsvImageFolderSource(csvs[0], Path(image_dir) if image_dir else path / "images", uids)
        else:
            opened = ParquetSource(path)
    else:
        raise DataError(f"{path}: not a parquet file/folder, a save_to_disk folder, a .csv, a .json/.jsonl "
                        "or a folder with w/ and l/ image folders")
    return adapt(opened, columns, root)


def _load_from_disk(path: Path, split: str):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: not a readable datasets.save_to_disk folder ({err})") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r} (has {', '.join(loaded)})")
        loaded = loaded[split]
    return ArrowDatasetSource(loaded, f"{path}[{split}]", path)


def _load_from_hub(name: str, split: str):
    parts = name.split("/")
    if len(parts) != 2 or not all(parts):
        raise DataError(f"{name} does not exist (expected a parquet folder, a save_to_disk folder, a .csv, or a "
                        "hub dataset id)")
    import datasets

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:
        hint = ("the hub is offline (HF_HUB_OFFLINE=1)" if offline else f"{type(err).__name__}: {err}")
        raise DataError(f"could not load hub dataset {name!r} ({hint}). Pick-a-Pic v2 is no longer on the hub: "
                        "point ncppo at a local mirror (parquet shards or a save_to_disk folder).") from err
    return ArrowDatasetSource(dataset, f"{name}[{split}]")
