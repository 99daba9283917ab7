"""Running the filter end to end: read metadata, select, write kept rows with their images, atomically.

Output is parquet in the same Pick-a-Pic schema, one part per source shard (streamed shard by shard),
plus ``stats.json``. It is built in a scratch folder and renamed into place at the end, so a killed run
never leaves an output that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ncppo.data.filter import Selection, build_graph, dataset_stats, select_pairs
from ncppo.data.pairs import PreferencePairs
from ncppo.io import atomic_directory

# columns that belong to one side of the pair, as (side 0, side 1)
SIDE_COLUMNS = (("jpg_0", "jpg_1"), ("image_0_uid", "image_1_uid"), ("image_0_url", "image_1_url"),
                ("model_0", "model_1"), ("label_0", "label_1"))


def _synthetic_rows(pairs: PreferencePairs, synthetic: np.ndarray, schema: pa.Schema) -> pa.Table:
    """Rows ``x > z`` built from x's row (its winner side) and z's row (its loser side)."""
    meta = pairs.meta
    rows = pairs.read_rows(synthetic.reshape(-1))  # one read per shard, not two per pair
    records = []
    for (winner_idx, loser_idx), w, lo in zip(synthetic, rows[0::2], rows[1::2]):
        w_side = 1 if meta.swapped[winner_idx] else 0
        l_side = 0 if meta.swapped[loser_idx] else 1  # the loser of that row
        record = dict(w)  # caption, user, time: x's comparison
        for pair in SIDE_COLUMNS:
            if pair[0] in record:
                record[pair[0]], record[pair[1]] = w[pair[w_side]], lo[pair[l_side]]
        record["label_0"], record["label_1"] = 1.0, 0.0
        if "best_image_uid" in record:
            record["best_image_uid"] = record["image_0_uid"]
        records.append(record)
    return pa.Table.from_pylist(records, schema=schema)


def write_selection(pairs: PreferencePairs, selection: Selection, out_dir: str | os.PathLike,
                    stats: dict, progress: bool = True) -> Path:
    """Write the selected rows (all columns, images included) and ``stats.json`` to ``out_dir``."""
    out_dir = Path(out_dir)
    meta = pairs.meta
    shards = meta.shard[selection.rows]
    with atomic_directory(out_dir) as tmp:
        schema = None
        for shard in tqdm(range(pairs.source.num_shards), desc="write", unit="shard", disable=not progress):
            rows = np.sort(meta.row[selection.rows[shards == shard]])
            if len(rows) == 0:
                continue
            table = pairs.source.rows(shard, rows)
            schema = schema or table.schema
            pq.write_table(table.cast(schema), tmp / f"part-{shard:05d}.parquet")
        if len(selection.synthetic):
            schema = schema or pairs.source.schema(0)
            pq.write_table(_synthetic_rows(pairs, selection.synthetic, schema), tmp / "part-synthetic.parquet")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    return out_dir


def filter_dataset(source, out_dir, *, min_wins: int = 2, pairs: str = "latest", variant: str | None = None,
                   on_bad_row: str = "skip", progress: bool = True, **source_kwargs) -> dict:
    """``ncppo data filter``: returns the statistics it writes (before, after, selection details, skips)."""
    reader = PreferencePairs(source, tie_policy="keep", on_bad_row=on_bad_row, **source_kwargs)
    graph = build_graph(reader.meta)  # once, for the statistics and the selection
    before = dataset_stats(reader.meta, min_wins=min_wins, skipped_rows=reader.skips.total, graph=graph)
    selection = select_pairs(reader.meta, min_wins=min_wins, pairs=pairs, variant=variant, graph=graph)
    del graph
    after = dataset_stats(reader.meta.take(selection.rows), min_wins=min_wins)
    after["rows"] += len(selection.synthetic)
    after["synthesised_pairs"] = len(selection.synthetic)
    stats = {
        "source": str(source),
        "rule": {"min_wins": min_wins, "pairs": pairs, "variant": variant},
        "before": before,
        "after": after,
        "selection": selection.details,
        "skipped": reader.skips.as_dict(),
    }
    write_selection(reader, selection, out_dir, stats, progress=progress)
    return stats
