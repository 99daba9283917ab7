"""Reading preference pairs: validated metadata up front, image bytes only when a batch needs them.

torch is imported only when batches are made, so filtering ~1M rows does not pay for it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from ncppo.data.images import decode_image, prepare_image, sdxl_time_ids
from ncppo.data.schema import (
    BAD_ROW_POLICIES,
    OPTIONAL_METADATA,
    REQUIRED_COLUMNS,
    DataError,
    NormalizedPairs,
    SkipReport,
    normalize,
)
from ncppo.data.sources import open_source

METADATA_COLUMNS = list(REQUIRED_COLUMNS + OPTIONAL_METADATA)


class PreferencePairs:
    """Pairs ``(caption, winner, loser)`` from any source, winner first, ties handled by ``tie_policy``.

    Bad rows (labels outside {0, 0.5, 1} or not summing to 1, an empty caption, a missing uid, one image
    against itself) are counted in :attr:`skips` with their locations, or raise with
    ``on_bad_row='error'``. Bad images (corrupt or truncated, missing files, one uid with two different
    images) are found when decoded and handled the same way.
    """

    def __init__(self, source, *, tie_policy: str = "drop", on_bad_row: str = "skip", split: str = "train",
                 image_dir: str | os.PathLike | None = None):
        if on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"unknown bad-row policy {on_bad_row!r}; expected one of {BAD_ROW_POLICIES}")
        self.source = source if hasattr(source, "metadata") else open_source(source, split=split, image_dir=image_dir)
        self.tie_policy, self.on_bad_row = tie_policy, on_bad_row
        self.skips = SkipReport()
        parts = []
        pool = pa.default_memory_pool()
        for i in range(self.source.num_shards):
            meta = self.source.metadata(i, METADATA_COLUMNS)
            parts.append(normalize(meta, i, self.source.shard_name(i), tie_policy, self.skips, on_bad_row))
            del meta
            pool.release_unused()  # hand the shard's read buffers back: Pick-a-Pic has ~1M rows
        self.meta: NormalizedPairs = NormalizedPairs.concat(parts)
        del parts
        pool.release_unused()
        self._image_digests: dict[str, tuple[str, str]] = {}

    def __len__(self) -> int:
        return len(self.meta)

    def where(self, i: int) -> str:
        return f"{self.source.shard_name(int(self.meta.shard[i]))} row {int(self.meta.row[i])}"

    # -- images ----------------------------------------------------------------------------------
    def read_rows(self, indices, columns: list[str] | None = None) -> list[dict]:
        """Source rows of pairs ``indices`` (in that order) as dicts, reading each shard once."""
        indices = np.asarray(indices, dtype=np.int64)
        out: list = [None] * len(indices)
        shards = self.meta.shard[indices]
        for shard in np.unique(shards):
            positions = np.nonzero(shards == shard)[0]
            table = self.source.rows(int(shard), self.meta.row[indices[positions]], columns)
            for pos, record in zip(positions, table.to_pylist()):
                out[pos] = record
        return out

    def image_bytes(self, indices) -> list[tuple[bytes | None, bytes | None]]:
        """``(winner, loser)`` image bytes for pairs ``indices``."""
        indices = np.asarray(indices, dtype=np.int64)
        out = []
        for i, record in zip(indices, self.read_rows(indices, ["jpg_0", "jpg_1"])):
            first, second = _as_bytes(record["jpg_0"]), _as_bytes(record["jpg_1"])
            out.append((second, first) if self.meta.swapped[i] else (first, second))
        return out

    def _check_uid(self, uid: str, data: bytes, where: str) -> None:
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        seen = self._image_digests.setdefault(uid, (digest, where))
        if seen[0] != digest:
            raise DataError(f"{where}: image uid {uid!r} has different image bytes than at {seen[1]}")

    def decoded(self, i: int, winner: bytes | None, loser: bytes | None):
        """Decode one pair's images, checking that each uid always has the same bytes."""
        base = self.where(i)
        w_col, l_col = ("jpg_1", "jpg_0") if self.meta.swapped[i] else ("jpg_0", "jpg_1")
        images = []
        for data, uid, column in ((winner, self.meta.uid_w[i].as_py(), w_col), (loser, self.meta.uid_l[i].as_py(), l_col)):
            where = f"{base} column {column}"
            images.append(decode_image(data, where))
            self._check_uid(uid, data, where)
        return images

    # -- batches ---------------------------------------------------------------------------------
    def plan(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
             indices=None) -> list[np.ndarray]:
        """The epoch's batches as arrays of pair indices, decoding nothing (resume skips cheaply)."""
        rng = np.random.default_rng(seed)
        order = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        if shuffle:
            order = rng.permutation(order)
        chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        return [c for c in chunks if len(c) == batch_size] if drop_last else chunks

    def batches(self, batch_size: int, resolution: int, *, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False, random_crop: bool = False, random_flip: bool = False,
                indices=None) -> Iterator:
        """Batches of decoded pairs (pixels in [-1, 1], prompts, SDXL ``time_ids``); bad images are
        skipped and counted (or raise with ``on_bad_row='error'``)."""
        for k, chunk in enumerate(self.plan(batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                            indices=indices)):
            rng = np.random.default_rng([seed, k])  # crops and flips: a function of (seed, batch)
            batch = self.collate(chunk, resolution, rng=rng, random_crop=random_crop, random_flip=random_flip)
            if batch is not None:
                yield batch

    def collate(self, chunk, resolution: int, *, rng=None, random_crop=False, random_flip=False):
        import torch

        from ncppo.batch import PreferenceBatch

        sides: dict[str, list] = {"w": [], "l": []}
        prompts, ids, ties = [], [], []
        for i, (wb, lb) in zip(chunk, self.image_bytes(chunk)):
            try:
                images = self.decoded(int(i), wb, lb)
            except DataError as err:
                if self.on_bad_row == "error":
                    raise
                self.skips.add("bad image", [str(err)])
                continue
            flip = bool(random_flip and rng is not None and rng.random() < 0.5)
            for side, img in zip(("w", "l"), images):
                sides[side].append(prepare_image(img, resolution, center_crop=not random_crop, flip=flip, rng=rng))
            prompts.append(self.meta.caption[int(i)].as_py())
            ids.append(int(i))
            ties.append(bool(self.meta.is_tie[i]))
        if not ids:
            return None
        stack = lambda key: torch.stack([p.pixels for p in sides[key]])  # noqa: E731
        times = lambda key: torch.stack([sdxl_time_ids(p, resolution) for p in sides[key]])  # noqa: E731
        return PreferenceBatch(pixel_values_w=stack("w"), pixel_values_l=stack("l"), prompts=prompts,
                               time_ids_w=times("w"), time_ids_l=times("l"), ids=ids,
                               is_tie=torch.tensor(ties) if any(ties) else None)


def _as_bytes(value) -> bytes | None:
    if isinstance(value, dict):  # datasets' Image feature stores {"bytes": ..., "path": ...}
        return value.get("bytes")
    return value
