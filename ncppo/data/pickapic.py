"""Writing comparisons in the Pick-a-Pic v2 schema (for the toy world, tests and benchmarks)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ncppo.io import atomic_directory

PICKAPIC_SCHEMA = pa.schema([
    ("are_different", pa.bool_()), ("best_image_uid", pa.string()), ("caption", pa.string()),
    ("created_at", pa.timestamp("ns")), ("has_label", pa.bool_()),
    ("image_0_uid", pa.string()), ("image_0_url", pa.string()),
    ("image_1_uid", pa.string()), ("image_1_url", pa.string()),
    ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
    ("label_0", pa.float64()), ("label_1", pa.float64()),
    ("model_0", pa.string()), ("model_1", pa.string()),
    ("ranking_id", pa.int64()), ("user_id", pa.int64()), ("num_example_per_prompt", pa.int64()),
])


@dataclass
class Comparison:
    """One judged pair: ``label_0`` is 1 (image 0 wins), 0 (image 1 wins) or 0.5 (a tie)."""

    caption: str
    uid_0: str
    uid_1: str
    label_0: float
    created_at: int = 0  # ns since epoch
    user_id: int = 0
    ranking_id: int = 0
    model_0: str = "model-a"
    model_1: str = "model-b"


IMAGE_ENCODINGS = ("png", "jpeg")


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    return image_bytes(array, "jpeg", quality)


def image_bytes(array: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """``array`` (uint8 ``(H, W, 3)``) encoded as ``png`` (lossless) or ``jpeg`` (Pick-a-Pic's own format, 4:2:0)."""
    from PIL import Image

    if image_format not in IMAGE_ENCODINGS:
        raise ValueError(f"unknown image format {image_format!r}; expected one of {', '.join(IMAGE_ENCODINGS)}")
    buf = io.BytesIO()
    options = {"quality": quality} if image_format == "jpeg" else {}
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format=image_format.upper(), **options)
    return buf.getvalue()


def comparisons_table(comparisons: Sequence[Comparison], images: dict[str, bytes] | None = None) -> pa.Table:
    """A Pick-a-Pic v2 table; image bytes come from ``images[uid]`` (None when absent: metadata only)."""
    images = images or {}
    cols: dict[str, list] = {name: [] for name in PICKAPIC_SCHEMA.names}
    for c in comparisons:
        label_1 = 1.0 - c.label_0
        best = c.uid_0 if c.label_0 == 1 else c.uid_1 if label_1 == 1 else None
        values = dict(are_different=c.uid_0 != c.uid_1, best_image_uid=best, caption=c.caption,
                      created_at=c.created_at, has_label=True, image_0_uid=c.uid_0, image_0_url=f"local://{c.uid_0}",
                      image_1_uid=c.uid_1, image_1_url=f"local://{c.uid_1}", jpg_0=images.get(c.uid_0),
                      jpg_1=images.get(c.uid_1), label_0=float(c.label_0), label_1=label_1, model_0=c.model_0,
                      model_1=c.model_1, ranking_id=c.ranking_id, user_id=c.user_id, num_example_per_prompt=1)
        for name in cols:
            cols[name].append(values[name])
    return pa.table(cols, schema=PICKAPIC_SCHEMA)


def write_parquet_shards(table: pa.Table, out_dir: str | os.PathLike, rows_per_shard: int = 1000,
                         row_group_size: int = 256) -> Path:
    """Write ``table`` as ``train-XXXXX.parquet`` shards, atomically."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        for k, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
            pq.write_table(table.slice(start, rows_per_shard), tmp / f"train-{k:05d}.parquet",
                           row_group_size=row_group_size)
    return out_dir
