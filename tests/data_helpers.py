"""Small Pick-a-Pic-format datasets written by the tests themselves."""

from __future__ import annotations

import hashlib

import numpy as np

from ncppo.data.pickapic import Comparison, comparisons_table, jpeg_bytes, write_parquet_shards


def colour_of(uid: str) -> tuple[int, int, int]:
    """A distinct solid colour per uid, so a decoded image tells which uid it is."""
    h = hashlib.sha256(uid.encode()).digest()
    return int(h[0]), int(h[1]), int(h[2])


def image_for(uid: str, size=(24, 32)) -> bytes:
    return jpeg_bytes(np.broadcast_to(np.array(colour_of(uid), dtype=np.uint8), (*size, 3)).copy(), quality=95)


def comparisons(spec: list[tuple]) -> list[Comparison]:
    """``(caption, uid_0, uid_1, label_0[, created_at[, user_id]])`` tuples -> comparisons."""
    out = []
    for k, item in enumerate(spec):
        caption, a, b, label = item[:4]
        created = item[4] if len(item) > 4 else k
        user = item[5] if len(item) > 5 else 0
        out.append(Comparison(caption, a, b, float(label), created_at=int(created) * 10**9, user_id=user, ranking_id=k))
    return out


def write_dataset(path, spec, rows_per_shard=4, images=None, row_group_size=2):
    comps = comparisons(spec)
    uids = {c.uid_0 for c in comps} | {c.uid_1 for c in comps}
    imgs = {u: image_for(u) for u in uids}
    imgs.update(images or {})
    write_parquet_shards(comparisons_table(comps, imgs), path, rows_per_shard=rows_per_shard,
                         row_group_size=row_group_size)
    return path
