import json

import pyarrow.parquet as pq
import pytest

from ncppo.cli import main
from ncppo.data.pairs import PreferencePairs
from ncppo.data.writer import filter_dataset

from .data_helpers import image_for, write_dataset

SPEC = [
    ("p", "x", "q", 1, 1), ("p", "x", "y", 1, 5), ("p", "y", "r", 1, 2), ("p", "y", "z", 1, 6),
    ("s", "a", "b", 1, 1), ("s", "c", "a", 0, 2), ("s", "b", "c", 0.5, 3),
    ("t", "m", "n", 1), ("t", "n", "m", 1),
]


def _read(path):
    return pq.read_table(sorted(path.glob("*.parquet"))).to_pylist() if path.is_dir() else []


def test_filter_writes_kept_rows_with_images_in_the_same_schema(tmp_path):
    src = write_dataset(tmp_path / "src", SPEC, rows_per_shard=3)
    stats = filter_dataset(src, tmp_path / "out", progress=False)
    rows = [r for p in sorted((tmp_path / "out").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted((r["caption"], r["image_0_uid"], r["image_1_uid"]) for r in rows) == [
        ("p", "x", "y"), ("s", "c", "a")]
    for r in rows:  # images travel with their rows, bytes unchanged
        assert r["jpg_0"] == image_for(r["image_0_uid"]) and r["jpg_1"] == image_for(r["image_1_uid"])
    src_schema = pq.read_schema(sorted(src.glob("*.parquet"))[0])
    assert pq.read_schema(sorted((tmp_path / "out").glob("*.parquet"))[0]) == src_schema
    on_disk = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert on_disk == json.loads(json.dumps(stats))
    assert stats["before"]["rows"] == 9 and stats["before"]["ties"] == 1 and stats["before"]["absolute_winners"] == 2
    assert stats["before"]["images_both_winner_and_loser"] == 3  # y, m, n
    assert stats["after"]["pairs"] == 2 and stats["after"]["prompts"] == 2
    again = PreferencePairs(tmp_path / "out")
    assert len(again) == 2 and len(next(again.batches(2, 8)).ids) == 2


def test_synthesised_x_over_z_row(tmp_path):
    src = write_dataset(tmp_path / "src", SPEC)
    stats = filter_dataset(src, tmp_path / "out", variant="x>y,x>z", progress=False)
    assert stats["after"]["synthesised_pairs"] == 1
    synthetic = pq.read_table(tmp_path / "out" / "part-synthetic.parquet").to_pylist()
    (row,) = synthetic
    assert (row["image_0_uid"], row["image_1_uid"], row["label_0"], row["label_1"]) == ("x", "z", 1.0, 0.0)
    assert row["jpg_0"] == image_for("x") and row["jpg_1"] == image_for("z") and row["best_image_uid"] == "x"


def test_a_crash_while_writing_leaves_no_output_and_keeps_the_old_one(tmp_path, monkeypatch):
    src = write_dataset(tmp_path / "src", SPEC, rows_per_shard=3)
    out = tmp_path / "out"
    filter_dataset(src, out, min_wins=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real = pq.write_table

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(pq, "write_table", dying)
    with pytest.raises(KeyboardInterrupt):
        filter_dataset(src, out, min_wins=2, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous output, untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    with pytest.raises(KeyboardInterrupt):
        calls["n"] = 0
        filter_dataset(src, tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh").exists()


def test_filter_cli(tmp_path, capsys):
    src = write_dataset(tmp_path / "src", SPEC)
    assert main(["data", "filter", str(src), str(tmp_path / "o"), "--min-wins", "1", "--pairs", "all"]) == 0
    printed = capsys.readouterr().out
    assert "absolute_winners" in printed and "wrote" in printed
    assert len(_read(tmp_path / "o")) == 4  # x>q, x>y and a>b, a>c
    assert main(["data", "filter", str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
