"""The data shapes besides Pick-a-Pic (ncppo.data.formats): each goes through `data filter` and `data cache`
like a Pick-a-Pic parquet, and each malformed case is one error (or counted skip) naming file, row and field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ncppo.cli import main
from ncppo.data.cache import LatentCache
from ncppo.data.formats import ColumnMapping
from ncppo.data.pairs import PreferencePairs
from ncppo.data.schema import DataError

from .data_helpers import (
    MAPPED_OPTIONS,
    WINNER_FIRST,
    colour_of,
    image_for,
    write_dataset,
    write_images,
    write_shape,
)

SHAPES = ["trl-parquet", "trl-disk", "trl-jsonl", "hpdv3", "folders", "mapped"]
MAPPING = ColumnMapping(caption="text", image_0="img_a", image_1="img_b", label_0="pref_a", label_1="pref_b")


def _options(kind):
    return MAPPED_OPTIONS if kind == "mapped" else []


def _colour(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))


def _close(got, want, tol=6):
    return all(abs(a - b) <= tol for a, b in zip(got, want))


@pytest.mark.parametrize("kind", SHAPES)
def test_each_shape_reads_winner_first(tmp_path, kind):
    pairs = PreferencePairs(write_shape(kind, tmp_path / "src"), columns=MAPPING if kind == "mapped" else None)
    assert len(pairs) == 4 and pairs.skips.total == 0
    assert pairs.meta.caption.to_pylist() == [c for c, _, _ in WINNER_FIRST]
    for i, (wb, lb) in enumerate(pairs.image_bytes(range(4))):
        _, winner, loser = WINNER_FIRST[i]
        assert _close(_colour(wb), colour_of(winner)) and _close(_colour(lb), colour_of(loser))
    # one image in two rows is one node (x's two wins): by path, or by content digest (bytes, folder files)
    assert pairs.meta.uid_w[0].as_py() == pairs.meta.uid_w[1].as_py() != pairs.meta.uid_w[2].as_py()


@pytest.mark.parametrize("kind", SHAPES)
def test_filter_round_trip_writes_pickapic(tmp_path, kind, capsys):
    src = write_shape(kind, tmp_path / "src")
    assert main(["data", "filter", str(src), str(tmp_path / "out"), *_options(kind)]) == 0
    assert "skipped rows: 0" in capsys.readouterr().out
    rows = pq.read_table(sorted((tmp_path / "out").glob("*.parquet"))).to_pylist()
    kept = [(r["caption"], _colour(r["jpg_0"]), _colour(r["jpg_1"]), r["label_0"], r["label_1"]) for r in rows]
    expected = [WINNER_FIRST[1]]  # x > z: x is the one image with two wins and no loss
    assert len(kept) == len(expected)
    for (caption, w, lo, l0, l1), (want_caption, want_w, want_l) in zip(kept, expected):
        assert caption == want_caption and (l0, l1) in ((1.0, 0.0), (0.0, 1.0))
        winner, loser = (w, lo) if l0 == 1.0 else (lo, w)
        assert _close(winner, colour_of(want_w)) and _close(loser, colour_of(want_l))
    again = PreferencePairs(tmp_path / "out")  # the output is Pick-a-Pic: read back without options
    assert len(again) == len(expected) and again.skips.total == 0
    if kind == "hpdv3":  # HPDv3's model names become Pick-a-Pic's; its other fields are kept
        assert rows[0]["model_0"] == "flux" and rows[0]["confidence"] == 0.99 and rows[0]["choice_dist"] == [3, 1]


@pytest.mark.parametrize("kind", SHAPES)
def test_cache_round_trip_equals_the_pickapic_cache(tmp_path, kind, tiny_pipeline_dirs):
    model = str(tiny_pipeline_dirs["sd15"])
    args = ["data", "cache", "--model", model, "--resolution", "16", "--pairs-per-shard", "3"]
    reference = write_dataset(tmp_path / "ref", [(c, w, lo, 1) for c, w, lo in WINNER_FIRST])
    assert main([*args, str(reference), str(tmp_path / "ref-cache")]) == 0
    assert main([*args, str(write_shape(kind, tmp_path / "src")), str(tmp_path / "cache"), *_options(kind)]) == 0
    assert json.loads((tmp_path / "cache" / "index.json").read_text())["cached_pairs"] == 4
    got = next(LatentCache(tmp_path / "cache").batches(4, shuffle=False))
    want = next(LatentCache(tmp_path / "ref-cache").batches(4, shuffle=False))
    assert got.prompts == want.prompts
    assert torch.equal(got.latents_w, want.latents_w) and torch.equal(got.latents_l, want.latents_l)
    assert torch.equal(got.prompt_embeds, want.prompt_embeds)


# -- malformed input: one error naming file, row and field; or a counted skip with the same location --------

def _jsonl(tmp_path, lines):
    write_images(tmp_path / "images", "abcd")
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "train.jsonl"


def _rec(**kw):
    base = {"prompt": "red", "path1": "images/a.jpg", "path2": "images/b.jpg"}
    base.update(kw)
    return json.dumps({k: v for k, v in base.items() if v is not ...})


@pytest.mark.parametrize(("line", "reason"), [
    ('{"prompt": "red", "path1": "images/a.jpg", "path2": ', "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    (_rec(path2=...), "no image (column 'path2' is empty)"),
    (_rec(path1="images/missing.jpg"), "image file not found (column 'path1')"),
    (_rec(prompt="  "), "empty caption"),
    (_rec(path2="images/a.jpg"), "a pair of one image with itself"),
])
def test_a_bad_jsonl_line_is_counted_or_named(tmp_path, line, reason):
    path = _jsonl(tmp_path, [_rec(), "", _rec(path1="images/c.jpg"), line, _rec(path1="images/d.jpg")])
    pairs = PreferencePairs(path)
    assert len(pairs) == 3 and pairs.skips.total == 1
    (found,) = [r for r in pairs.skips.counts if reason in r]
    assert pairs.skips.examples[found] == [f"{path} line 4"]  # line numbers count the blank line
    with pytest.raises(DataError, match=rf"train.jsonl line 4: .*{reason.split()[0]}"):
        PreferencePairs(path, on_bad_row="error")


def test_json_shape_errors_name_the_file_line_and_field(tmp_path, capsys):
    path = _jsonl(tmp_path, [_rec(), _rec(prompt=7)])
    with pytest.raises(DataError, match=r"train.jsonl line 2: field 'prompt' is int where earlier records have str"):
        PreferencePairs(path)
    (tmp_path / "one.json").write_text('{"prompt": "red"}')
    assert main(["data", "stats", str(tmp_path / "one.json")]) == 2
    assert "one.json: a JSON array of records expected, found a dict" in capsys.readouterr().err
    (tmp_path / "cols.json").write_text(json.dumps([{"text": "red", "left": "a.jpg"}]))
    with pytest.raises(DataError, match=r"cols.json: missing column\(s\) .*match no known shape.*--caption-column"):
        PreferencePairs(tmp_path / "cols.json")


def test_mapping_errors_name_the_option_and_the_columns(tmp_path, capsys):
    src = write_shape("mapped", tmp_path / "src")
    options = [o if o != "text" else "caption_text" for o in MAPPED_OPTIONS]
    assert main(["data", "stats", str(src), *options]) == 2
    err = capsys.readouterr().err
    assert "mine.parquet: missing column(s) 'caption_text' (given as --caption-column)" in err
    assert "the columns are text, img_a, img_b, pref_a, pref_b" in err and "Traceback" not in err
    assert main(["data", "stats", str(src), *MAPPED_OPTIONS]) == 0
    # a parquet in the TRL shape under other names, by --chosen-column/--rejected-column
    pq.write_table(pa.table({"caption": ["red"], "good": [image_for("a")], "bad": [image_for("b")]}),
                   tmp_path / "good_bad.parquet")
    pairs = PreferencePairs(tmp_path / "good_bad.parquet", columns=ColumnMapping(chosen="good", rejected="bad",
                                                                                 caption="caption"))
    assert len(pairs) == 1 and _close(_colour(pairs.image_bytes([0])[0][0]), colour_of("a"))


def test_trl_errors_name_the_row_and_the_column(tmp_path):
    pq.write_table(pa.table({"prompt": ["red", "blue"], "chosen": [image_for("a"), None],
                             "rejected": [image_for("b"), image_for("c")]}), tmp_path / "t.parquet")
    pairs = PreferencePairs(tmp_path / "t.parquet")
    assert len(pairs) == 1 and pairs.skips.examples["no image (column 'chosen' is empty)"] == [
        f"{tmp_path / 't.parquet'} row 1"]
    with pytest.raises(DataError, match=r"t.parquet row 1: no image \(column 'chosen' is empty\)"):
        PreferencePairs(tmp_path / "t.parquet", on_bad_row="error")
    conversational = [[{"role": "user", "content": "red"}]]
    pq.write_table(pa.table({"prompt": conversational, "chosen": [image_for("a")], "rejected": [image_for("b")]}),
                   tmp_path / "chat.parquet")
    with pytest.raises(DataError, match=r"chat.parquet: column 'prompt' holds list<.*not text.*--caption-column"):
        PreferencePairs(tmp_path / "chat.parquet")
    pq.write_table(pa.table({"prompt": ["red"], "chosen": [1], "rejected": [2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints.parquet: column 'chosen' holds int64: expected image bytes"):
        PreferencePairs(tmp_path / "ints.parquet")


def test_folder_pairs_name_what_is_missing(tmp_path):
    root = write_shape("folders", tmp_path / "d")
    (root / "l" / "pair1.jpg").unlink()  # a winner without its loser
    (root / "w" / "pair2.caption").unlink()
    (root / "l" / "pair2.caption").unlink()  # no caption at all
    (root / "l" / "pair3.caption").write_text("green")  # the two sides disagree
    (root / "w" / "extra.png").write_bytes(image_for("q"))
    pairs = PreferencePairs(root)
    assert len(pairs) == 1 and pairs.skips.total == 4
    assert pairs.skips.examples == {
        "no loser (l/) image of the same name": [f"{root} pair extra", f"{root} pair pair1"],
        "no caption file (NAME.caption or NAME.txt beside the image)": [f"{root} pair pair2"],
        "the winner's and the loser's captions differ": [f"{root} pair pair3"]}
    with pytest.raises(DataError, match=r"d pair extra: no loser \(l/\) image of the same name"):
        PreferencePairs(root, on_bad_row="error")


def test_kohya_subsets_and_txt_captions(tmp_path):
    for subset, uid in (("1_cats", "a"), ("3_dogs", "b")):
        for side, colour in (("w", uid), ("l", uid + "2")):
            write_images(tmp_path / "d" / subset / side, [colour])
            (tmp_path / "d" / subset / side / f"{colour}.jpg").rename(tmp_path / "d" / subset / side / "img.jpg")
        (tmp_path / "d" / subset / "w" / "img.txt").write_text(subset.split("_")[1])
    pairs = PreferencePairs(tmp_path / "d")
    assert pairs.meta.caption.to_pylist() == ["cats", "dogs"] and pairs.where(1).endswith("pair 3_dogs/img")


def test_a_role_left_unnamed_says_which_option_names_it(tmp_path):
    pq.write_table(pa.table({"prompt": ["red"], "good": [image_for("a")]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet: missing column\(s\) 'rejected' \(the rejected column; "
                                        r"--rejected-column names another\); the columns are prompt, good"):
        PreferencePairs(tmp_path / "t.parquet", columns=ColumnMapping(chosen="good"))
