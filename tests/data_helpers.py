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


# -- the other shapes (ncppo.data.formats) ------------------------------------------------------------------

WINNER_FIRST = [("red", "x", "y"), ("red", "x", "z"), ("red", "y", "z"), ("blue", "a", "b")]
"""(caption, winner, loser): x is the one absolute winner with 2 wins; its latest pair is x > z (row 1)."""


def write_images(folder, uids, suffix=".jpg"):
    folder.mkdir(parents=True, exist_ok=True)
    for uid in uids:
        (folder / f"{uid}{suffix}").write_bytes(image_for(uid))
    return folder


def write_shape(kind: str, root, spec=WINNER_FIRST):
    """``spec`` in one of the shapes ncppo reads besides Pick-a-Pic; returns the path to pass to a reader.

    ``trl-parquet`` (bytes), ``trl-disk`` (save_to_disk, datasets Image feature), ``trl-jsonl`` (paths),
    ``hpdv3`` (a JSON array as MizzenAI/HPDv3's train.json, images/ beside it), ``folders`` (w/, l/ and
    .caption files) and ``mapped`` (a parquet with its own column names, image 1 winning on odd rows).
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    uids = sorted({u for _, w, lo in spec for u in (w, lo)})
    if kind == "trl-parquet":
        pq.write_table(pa.table({"prompt": [c for c, _, _ in spec], "chosen": [image_for(w) for _, w, _ in spec],
                                 "rejected": [image_for(lo) for _, _, lo in spec]}), root / "trl.parquet")
        return root / "trl.parquet"
    if kind == "trl-disk":
        import datasets

        features = datasets.Features({"prompt": datasets.Value("string"), "chosen": datasets.Image(),
                                      "rejected": datasets.Image()})
        data = {"prompt": [c for c, _, _ in spec], "chosen": [{"bytes": image_for(w), "path": None} for _, w, _ in spec],
                "rejected": [{"bytes": image_for(lo), "path": None} for _, _, lo in spec]}
        datasets.Dataset.from_dict(data, features=features).save_to_disk(str(root / "disk"))
        return root / "disk"
    if kind == "trl-jsonl":
        write_images(root / "img", uids)
        lines = [json.dumps({"prompt": c, "chosen": f"img/{w}.jpg", "rejected": f"img/{lo}.jpg"}) for c, w, lo in spec]
        (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
        return root / "pairs.jsonl"
    if kind == "hpdv3":
        write_images(root / "images", uids)
        records = [{"prompt": c, "choice_dist": [3, 1], "confidence": 0.99, "path1": f"images/{w}.jpg",
                    "path2": f"images/{lo}.jpg", "model1": "flux", "model2": "sdxl"} for c, w, lo in spec]
        (root / "train.json").write_text(json.dumps(records, indent=1))
        return root / "train.json"
    if kind == "folders":
        for k, (caption, w, lo) in enumerate(spec):  # one file name per pair; the images are the uids' colours
            for side, uid in (("w", w), ("l", lo)):
                (root / side).mkdir(exist_ok=True)
                (root / side / f"pair{k}.jpg").write_bytes(image_for(uid))
                (root / side / f"pair{k}.caption").write_text(caption + "\n")
        return root
    if kind == "mapped":
        rows = [(c, lo, w, 0.0, 1.0) if k % 2 else (c, w, lo, 1.0, 0.0) for k, (c, w, lo) in enumerate(spec)]
        pq.write_table(pa.table({"text": [r[0] for r in rows], "img_a": [image_for(r[1]) for r in rows],
                                 "img_b": [image_for(r[2]) for r in rows], "pref_a": [r[3] for r in rows],
                                 "pref_b": [r[4] for r in rows]}), root / "mine.parquet")
        return root / "mine.parquet"
    raise ValueError(kind)


MAPPED_OPTIONS = ["--caption-column", "text", "--image-0-column", "img_a", "--image-1-column", "img_b",
                  "--label-0-column", "pref_a", "--label-1-column", "pref_b"]
