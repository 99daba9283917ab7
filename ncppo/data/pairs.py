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
    IMAGE_COLUMNS,
    OPTIONAL_METADATA,
    REQUIRED_COLUMNS,
    DataError,
    NormalizedPairs,
    SkipReport,
    check_columns,
    normalize,
)
from ncppo.data.sources import open_source
from ncppo.errors import UsageError

METADATA_COLUMNS = list(REQUIRED_COLUMNS + OPTIONAL_METADATA)


class PreferencePairs:
    """Pairs ``(caption, winner, loser)`` from any source, winner first, ties handled by ``tie_policy``.

    Bad rows (labels outside {0, 0.5, 1} or not summing to 1, an empty caption, a missing uid, one image
    against itself) are counted in :attr:`skips` with their locations, or raise with
    ``on_bad_row='error'``. Bad images (corrupt or truncated, over ``max_image_pixels``, missing files, one
    uid with two different images) are found when decoded and handled the same way.

    One uid with two different images: the uid's first occurrence (the lowest pair index, winner before
    loser) holds its image, and any other occurrence with other bytes is the bad one. The decision does
    not depend on the order pairs are read (shuffled batches, a resumed cache, several processes): the
    first occurrence's bytes are read when they are not known yet.

    ``columns`` (a :class:`ncppo.data.formats.ColumnMapping`) names the columns of a source in another
    shape; TRL, HPDv3 and winner/loser folders are recognised without it (see :mod:`ncppo.data.formats`).
    """

    def __init__(self, source, *, tie_policy: str = "drop", on_bad_row: str = "skip", split: str = "train",
                 image_dir: str | os.PathLike | None = None, max_image_pixels: int | None = None,
                 columns=None):
        if on_bad_row not in BAD_ROW_POLICIES:
            raise UsageError(f"unknown bad-row policy {on_bad_row!r}; expected one of {BAD_ROW_POLICIES}")
        self.source = source if hasattr(source, "metadata") else open_source(source, split=split, image_dir=image_dir,
                                                                              columns=columns)
        self.tie_policy, self.on_bad_row = tie_policy, on_bad_row
        self.skips = SkipReport()
        parts = []
        pool = pa.default_memory_pool()
        for i in range(self.source.num_shards):
            # the images too: a shard without them would pass here and fail in the middle of training
            check_columns(self.source.schema(i), self.source.shard_name(i), REQUIRED_COLUMNS + IMAGE_COLUMNS)
            meta = self.source.metadata(i, METADATA_COLUMNS)
            parts.append(normalize(meta, i, self.source.shard_name(i), tie_policy, self.skips, on_bad_row,
                                   problems=row_problems(self.source, i),
                                   row_label=lambda row, i=i: row_label(self.source, i, row)))
            del meta
            pool.release_unused()  # hand the shard's read buffers back: Pick-a-Pic has ~1M rows
        self.meta: NormalizedPairs = NormalizedPairs.concat(parts)
        del parts
        pool.release_unused()
        self.max_image_pixels = max_image_pixels
        self._first_slot: np.ndarray | None = None  # per image slot (2 * pair + side): the uid's first slot
        self._repeated: np.ndarray | None = None  # per image slot: its uid occurs more than once
        self._digests: np.ndarray | None = None  # per slot: the digest of the bytes there (first slots only)
        self._known: np.ndarray | None = None  # per slot: that digest is known

    def __len__(self) -> int:
        return len(self.meta)

    def where(self, i: int) -> str:
        shard, row = int(self.meta.shard[i]), int(self.meta.row[i])
        return f"{self.source.shard_name(shard)} {row_label(self.source, shard, row)}"

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

    # -- one uid, one image ----------------------------------------------------------------------
    def first_slots(self) -> np.ndarray:
        """For every image slot ``2 * pair + side`` (side 0: winner, 1: loser), the first slot of its uid.

        Metadata only; computed once, when images are first needed.
        """
        if self._first_slot is None:
            import pyarrow.compute as pc

            n = len(self)
            uids = pa.chunked_array(self.meta.uid_w.chunks + self.meta.uid_l.chunks, pa.string()).combine_chunks()
            codes = np.asarray(pc.dictionary_encode(uids).indices.to_numpy(zero_copy_only=False), dtype=np.int64)
            slot_codes = np.empty(2 * n, dtype=np.int64)
            slot_codes[0::2], slot_codes[1::2] = codes[:n], codes[n:]
            _, first, inverse, counts = np.unique(slot_codes, return_index=True, return_inverse=True,
                                                  return_counts=True)
            inverse = inverse.reshape(-1)
            self._first_slot, self._repeated = first[inverse], counts[inverse] > 1
            # digests of the first occurrences (16 bytes a slot: ~32 MB for Pick-a-Pic's ~1M pairs)
            self._digests, self._known = np.zeros((2 * n, 16), dtype=np.uint8), np.zeros(2 * n, dtype=bool)
        return self._first_slot

    def _slot_column(self, slot: int) -> str:
        winner_side = 1 if self.meta.swapped[slot // 2] else 0
        return f"jpg_{winner_side if slot % 2 == 0 else 1 - winner_side}"

    def _slot_uid(self, slot: int) -> str:
        return (self.meta.uid_w if slot % 2 == 0 else self.meta.uid_l)[slot // 2].as_py()

    def first_image_digests(self, indices) -> dict[str, str]:
        """``{slot: digest}`` of the known first occurrences (of uids that occur again) among pairs ``indices``:
        a cache stores them with each shard, so that a resumed build need not read those images again."""
        first = self.first_slots()
        slots = np.concatenate([2 * np.asarray(indices, dtype=np.int64), 2 * np.asarray(indices, dtype=np.int64) + 1])
        slots = slots[(first[slots] == slots) & self._known[slots]]
        return {str(int(s)): self._digests[s].tobytes().hex() for s in slots}

    def remember_first_image_digests(self, digests: dict[str, str]) -> None:
        first = self.first_slots()
        for key, value in digests.items():
            slot = int(key)
            if 0 <= slot < len(first) and first[slot] == slot:
                self._digests[slot] = np.frombuffer(bytes.fromhex(value), dtype=np.uint8)
                self._known[slot] = True

    def _learn_first_images(self, indices, image_bytes=None) -> None:
        """Digests of the first occurrences of the uids of pairs ``indices`` (reading the ones not known)."""
        first = self.first_slots()
        indices = np.asarray(indices, dtype=np.int64)
        if image_bytes is not None:  # bytes in hand: the first occurrences among them cost nothing
            for i, pair in zip(indices, image_bytes):
                for side in (0, 1):
                    slot = 2 * int(i) + side
                    if first[slot] == slot and self._repeated[slot] and not self._known[slot]:
                        self._remember(slot, pair[side])
        slots = np.concatenate([2 * indices, 2 * indices + 1])
        origins = first[slots]
        wanted = np.unique(origins[(origins != slots) & ~self._known[origins]])
        if len(wanted):  # later occurrences whose first one was not read yet (shuffled, resumed, other ranks)
            needed = np.unique(wanted // 2)
            fetched = dict(zip(needed.tolist(), self.image_bytes(needed)))
            for s in wanted.tolist():
                self._remember(s, fetched[s // 2][s % 2])

    def _remember(self, slot: int, data: bytes | None) -> None:
        self._digests[slot] = np.frombuffer(_digest(data), dtype=np.uint8)
        self._known[slot] = True

    def decoded(self, i: int, winner: bytes | None, loser: bytes | None):
        """Decode one pair's images, checking that each uid has the bytes of its first occurrence."""
        base = self.where(i)
        first = self.first_slots()
        self._learn_first_images([i], [(winner, loser)])
        images = []
        for side, data in enumerate((winner, loser)):
            slot = 2 * int(i) + side
            where = f"{base} column {self._slot_column(slot)}"
            images.append(decode_image(data, where, self.max_image_pixels))
            origin = int(first[slot])
            if origin != slot and _digest(data) != self._digests[origin].tobytes():
                raise DataError(f"{where}: image uid {self._slot_uid(slot)!r} has different image bytes than at "
                                f"{self.where(origin // 2)} column {self._slot_column(origin)}")
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
        chunk = np.asarray(chunk, dtype=np.int64)
        pair_bytes = self.image_bytes(chunk)
        self._learn_first_images(chunk, pair_bytes)  # one read for the batch's unknown first occurrences
        for i, (wb, lb) in zip(chunk, pair_bytes):
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


def row_label(source, shard: int, row: int) -> str:
    """How ``source`` names a row: ``row N``, or its own label (``line 7`` of a JSONL, ``pair w/NAME``)."""
    label = getattr(source, "row_label", None)
    return label(shard, row) if label else f"row {row}"


def row_problems(source, shard: int) -> dict:
    """The source's own findings about its rows (reason -> mask), if it has any."""
    problems = getattr(source, "row_problems", None)
    return problems(shard) if problems else {}


def _digest(data: bytes | None) -> bytes:
    return hashlib.blake2b(data or b"", digest_size=16).digest()


def _as_bytes(value) -> bytes | None:
    if isinstance(value, dict):  # datasets' Image feature stores {"bytes": ..., "path": ...}
        return value.get("bytes")
    return value
