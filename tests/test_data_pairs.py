import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ncppo.data.pairs import PreferencePairs
from ncppo.data.pickapic import comparisons_table
from ncppo.data.schema import DataError
from ncppo.data.sources import ArrowDatasetSource, CsvImageFolderSource, ParquetSource

from .data_helpers import colour_of, comparisons, image_for, write_dataset

SPEC = [("red", "a", "b", 1), ("red", "c", "a", 0), ("blue", "d", "e", 0.5), ("blue", "e", "f", 0)]


def _winner_uids(batch, pairs):
    return [pairs.meta.uid_w[i].as_py() for i in batch.ids]


def _pixel_colour(pixels):
    return tuple(int(round(v)) for v in ((pixels[:, 8, 8] + 1) * 127.5).tolist())


def test_parquet_folder_winner_first_and_lazy_images(tmp_path):
    pairs = PreferencePairs(write_dataset(tmp_path / "d", SPEC))
    assert isinstance(pairs.source, ParquetSource) and pairs.source.num_shards == 1
    assert len(pairs) == 3 and pairs.skips.counts["tie dropped (tie policy 'drop')"] == 1
    assert [pairs.meta.uid_w[i].as_py() for i in range(3)] == ["a", "a", "f"]
    assert pairs.meta.swapped.tolist() == [False, True, True]
    batch = next(pairs.batches(3, 16, shuffle=False))
    assert batch.prompts == ["red", "red", "blue"] and batch.pixel_values_w.shape == (3, 3, 16, 16)
    for k, uid in enumerate(_winner_uids(batch, pairs)):
        got = _pixel_colour(batch.pixel_values_w[k])
        assert max(abs(a - b) for a, b in zip(got, colour_of(uid))) <= 6  # JPEG rounding
    # original 24x32 (h x w): resized to 16x21, centre crop left = 2
    assert batch.time_ids_w[0].tolist() == [24.0, 32.0, 0.0, 2.0, 16.0, 16.0]


def test_tie_policies(tmp_path):
    path = write_dataset(tmp_path / "d", SPEC)
    keep = PreferencePairs(path, tie_policy="keep")
    assert len(keep) == 4 and keep.meta.is_tie.tolist() == [False, False, True, False]
    batch = next(keep.batches(4, 8, shuffle=False))
    assert batch.is_tie.tolist() == [False, False, True, False]
    with pytest.raises(DataError, match=r"train-00000.parquet row 2: a tie"):
        PreferencePairs(path, tie_policy="error")
    with pytest.raises(ValueError, match="unknown tie policy"):
        PreferencePairs(path, tie_policy="half")


def test_sharded_rows_map_back_to_their_shard(tmp_path):
    spec = [(f"p{k}", f"u{k}", f"v{k}", k % 2) for k in range(11)]
    pairs = PreferencePairs(write_dataset(tmp_path / "d", spec, rows_per_shard=4, row_group_size=3))
    assert pairs.source.num_shards == 3 and pairs.meta.row.tolist() == [0, 1, 2, 3] * 2 + [0, 1, 2]
    batch = next(pairs.batches(11, 8, shuffle=True, seed=3))
    for k, i in enumerate(batch.ids):
        uid = pairs.meta.uid_w[i].as_py()
        got = _pixel_colour(torch.nn.functional.interpolate(batch.pixel_values_w[k : k + 1], size=16)[0])
        assert max(abs(a - b) for a, b in zip(got, colour_of(uid))) <= 6
        assert batch.prompts[k] == f"p{uid[1:]}"


def test_save_to_disk_folder(tmp_path):
    import datasets

    table = comparisons_table(comparisons(SPEC), {u: image_for(u) for u in "abcdef"})
    ds = datasets.Dataset(table)
    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    pairs = PreferencePairs(tmp_path / "dd")
    assert isinstance(pairs.source, ArrowDatasetSource) and len(pairs) == 3
    assert len(PreferencePairs(tmp_path / "dd", split="validation")) == 1
    with pytest.raises(DataError, match="no split 'test'"):
        PreferencePairs(tmp_path / "dd", split="test")
    assert _winner_uids(next(pairs.batches(3, 8, shuffle=False)), pairs) == ["a", "a", "f"]


def test_authors_csv_layout(tmp_path):
    rows = ["caption,image_0_uid,image_1_uid,label_0,label_1,created_at,user_id"]
    rows += ["red,a,b,1,0,2024-01-01 10:00:00,1", "red,c,a,0,1,2024-01-02 10:00:00,2", "blue,d,e,0,1,,3"]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "images").mkdir()
    for uid in "abcde":
        (tmp_path / "images" / f"{uid}.jpg").write_bytes(image_for(uid))
    pairs = PreferencePairs(tmp_path / "pairs.csv")
    assert isinstance(pairs.source, CsvImageFolderSource) and len(pairs) == 3
    assert pairs.meta.created_at[1] > pairs.meta.created_at[0] and pairs.meta.created_at[2] == -1
    assert _winner_uids(next(pairs.batches(3, 8, shuffle=False)), pairs) == ["a", "a", "e"]
    (tmp_path / "images" / "e.jpg").unlink()
    broken = PreferencePairs(tmp_path / "pairs.csv")
    assert len(next(broken.batches(3, 8, shuffle=False)).ids) == 2
    assert "no image data" in broken.skips.examples["bad image"][0] and "row 2 column jpg_1" in broken.skips.examples["bad image"][0]


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="could not load hub dataset 'nobody/pickapic'.*local mirror"):
        PreferencePairs("nobody/pickapic")


@pytest.mark.parametrize(("change", "reason"), [
    ({"label_0": 0.7, "label_1": 0.3}, "labels not in {0, 0.5, 1}"),
    ({"label_0": 1.0, "label_1": 1.0}, "not summing to 1"),
    ({"caption": "   "}, "empty caption"),
    ({"image_0_uid": "a"}, "a pair of one image with itself"),
])
def test_bad_rows_are_counted_or_raise(tmp_path, change, reason):
    table = comparisons_table(comparisons(SPEC), {u: image_for(u) for u in "abcdef"}).to_pylist()
    table[1].update(change)
    (tmp_path / "d").mkdir()
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "d" / "x.parquet")
    pairs = PreferencePairs(tmp_path / "d")
    assert len(pairs) == 2 and any(reason in r for r in pairs.skips.counts)
    assert any("x.parquet row 1" in e for r, ex in pairs.skips.examples.items() for e in ex if reason in r)
    with pytest.raises(DataError, match=rf"x.parquet row 1: .*{reason.split()[0]}"):
        PreferencePairs(tmp_path / "d", on_bad_row="error")


def test_missing_column_names_file_and_column(tmp_path):
    table = comparisons_table(comparisons(SPEC)).drop_columns(["label_1"])
    (tmp_path / "d").mkdir()
    pq.write_table(table, tmp_path / "d" / "x.parquet")
    with pytest.raises(DataError, match=r"x.parquet: missing column\(s\) 'label_1'"):
        PreferencePairs(tmp_path / "d")


def test_corrupt_and_truncated_images_and_conflicting_uids(tmp_path):
    good = image_for("a")
    spec = [("p", "a", "b", 1), ("p", "c", "d", 1), ("p", "e", "f", 1), ("q", "a", "g", 1)]
    table = comparisons_table(comparisons(spec), {u: image_for(u) for u in "abcdefg"}).to_pylist()
    table[1]["jpg_0"] = b"not a jpeg"
    table[2]["jpg_1"] = image_for("f")[:60]  # truncated
    table[3]["jpg_0"] = image_for("z")  # uid 'a' again, other bytes
    (tmp_path / "d").mkdir()
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "d" / "x.parquet")
    pairs = PreferencePairs(tmp_path / "d")
    batch = next(pairs.batches(4, 8, shuffle=False))
    assert batch.ids == [0] and pairs.skips.counts["bad image"] == 3
    examples = " | ".join(pairs.skips.examples["bad image"])
    assert "row 1 column jpg_0: cannot decode" in examples and "row 2 column jpg_1: cannot decode" in examples
    assert "row 3 column jpg_0: image uid 'a' has different image bytes" in examples
    strict = PreferencePairs(tmp_path / "d", on_bad_row="error")
    with pytest.raises(DataError, match="row 1 column jpg_0: cannot decode"):
        list(strict.batches(4, 8, shuffle=False))
    assert good  # the first row's image was fine


def test_stats_cli_json(tmp_path):
    from ncppo.cli import main

    path = write_dataset(tmp_path / "d", SPEC)
    assert main(["data", "stats", str(path), "--json", str(tmp_path / "s.json"), "--check-images"]) == 0
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["pairs"] == 3 and stats["ties"] == 1 and stats["skipped"]["total"] == 0
    assert np.isclose(stats["prompts"], 2)
