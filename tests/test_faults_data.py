"""Fault reproductions for the data layer (issue 12 "Nothing lost", issue 18): each test is one fault and
what happens now. Kills are real SIGKILLs of a subprocess."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ncppo.cli import main
from ncppo.data import images as images_module
from ncppo.data.pairs import PreferencePairs
from ncppo.data.pickapic import comparisons_table, jpeg_bytes
from ncppo.data.schema import DataError
from ncppo.data.writer import filter_dataset
from ncppo.errors import OutputDirError, StateError
from ncppo.io import OUTPUT_MARKER, mark_output_dir

from .data_helpers import comparisons, image_for, write_dataset

SPEC = [("p", "x", "q", 1, 1), ("p", "x", "y", 1, 5), ("s", "a", "b", 1, 1), ("s", "c", "a", 0, 2)]


def _write_rows(folder, rows, name="x.parquet"):
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / name)
    return folder


def _bomb() -> bytes:
    """A ~630-byte JPEG whose header claims 10000x10000 px (it would decode into ~1 GB)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG", quality=10)
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (10000).to_bytes(2, "big") * 2
    return bytes(data)


# -- 1. data filter / data cache / generate never delete or mix up data ----------------------------------

def test_filter_refuses_outputs_that_would_destroy_data(tmp_path, capsys):
    src = write_dataset(tmp_path / "src", SPEC)
    before = sorted(p.name for p in src.iterdir())
    for out, message in [(src, "is the input"), (src / "filtered", "is inside the input"),
                         (tmp_path, "contains the input")]:
        with pytest.raises(OutputDirError, match=message):
            filter_dataset(src, out, progress=False)
    assert sorted(p.name for p in src.iterdir()) == before  # the source is untouched
    (tmp_path / "file.txt").write_text("keep me")
    with pytest.raises(OutputDirError, match="is a file"):
        filter_dataset(src, tmp_path / "file.txt", progress=False)
    assert (tmp_path / "file.txt").read_text() == "keep me"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["data", "filter", str(src), str(other), "--min-wins", "1"]) == 2
    assert "no ncppo command wrote" in capsys.readouterr().err and (other / "notes.txt").read_text() == "mine"
    # an output of another command is refused too
    mark_output_dir(other, "train")
    with pytest.raises(OutputDirError, match="an output of `ncppo train`"):
        filter_dataset(src, other, progress=False)
    assert main(["data", "filter", str(src), str(other), "--min-wins", "1", "--overwrite"]) == 0
    assert not (other / "notes.txt").exists() and (other / "stats.json").is_file()


def test_filter_reruns_into_its_own_output_and_a_csv_source_is_guarded(tmp_path):
    src = write_dataset(tmp_path / "src", SPEC)
    out = tmp_path / "out"
    filter_dataset(src, out, min_wins=1, progress=False)
    assert json.loads((out / OUTPUT_MARKER).read_text()) == {"command": "data filter"}
    assert filter_dataset(src, out, min_wins=2, progress=False)["rule"]["min_wins"] == 2  # accepted, replaced
    assert json.loads((out / "stats.json").read_text())["rule"]["min_wins"] == 2
    (out / OUTPUT_MARKER).unlink()  # an output written before outputs were marked is still recognised
    filter_dataset(src, out, min_wins=1, progress=False)
    # the authors' layout: the CSV and its image folder are inputs
    (tmp_path / "csv" / "images").mkdir(parents=True)
    (tmp_path / "csv" / "pairs.csv").write_text("caption,image_0_uid,image_1_uid,label_0,label_1\np,a,b,1,0\n")
    with pytest.raises(OutputDirError, match="is inside the input"):
        filter_dataset(tmp_path / "csv" / "pairs.csv", tmp_path / "csv" / "images" / "out", progress=False)


KILL_DURING_FILTER_SWAP = textwrap.dedent("""
    import os, signal, sys
    import ncppo.io as nio
    from ncppo.data.writer import filter_dataset

    nio._exchange = lambda a, b: False  # two renames: the kill falls between them
    real = os.replace

    def dying(a, b):
        if str(a).rsplit("/", 1)[-1].startswith(".new-"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(a, b)

    os.replace = dying
    filter_dataset(sys.argv[1], sys.argv[2], min_wins=2, progress=False)
""")


def test_a_filter_killed_while_swapping_its_output_is_completed_by_the_next_run(tmp_path):
    src = write_dataset(tmp_path / "src", SPEC)
    out = tmp_path / "out"
    filter_dataset(src, out, min_wins=1, progress=False)
    run = subprocess.run([sys.executable, "-c", KILL_DURING_FILTER_SWAP, str(src), str(out)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert not out.exists() and sorted(p.name[:5] for p in tmp_path.iterdir() if p.name.startswith(".")) == [
        ".new-", ".old-"]  # killed between the two renames
    assert len(PreferencePairs(src)) == len(SPEC)  # the source never moved
    stats = filter_dataset(src, out, min_wins=1, progress=False)  # restores the killed run's output, then replaces it
    assert json.loads((out / "stats.json").read_text()) == json.loads(json.dumps(stats))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_cache_refuses_foreign_folders_and_resumes_its_own(tmp_path, tiny_pipeline_dirs, capsys):
    src = write_dataset(tmp_path / "src", SPEC)
    model = str(tiny_pipeline_dirs["sd15"])
    args = ["data", "cache", "--model", model, "--resolution", "16", "--pairs-per-shard", "2"]
    assert main([*args, str(src), str(src)]) == 2
    assert "is the input" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main([*args, str(src), str(other)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (other / "notes.txt").read_text() == "mine"
    assert main([*args, str(src), str(other), "--overwrite"]) == 0
    assert not (other / "notes.txt").exists() and json.loads((other / "index.json").read_text())["cached_pairs"] == 4
    (other / "index.json").unlink()
    (other / "shard-00001.safetensors").unlink()  # a partial cache: the rerun resumes into it
    first = (other / "shard-00000.safetensors").stat().st_mtime_ns
    assert main([*args, str(src), str(other)]) == 0
    assert (other / "shard-00000.safetensors").stat().st_mtime_ns == first
    assert json.loads((other / "index.json").read_text())["cached_pairs"] == 4


def test_generate_refuses_foreign_folders_and_resumes_its_own(tmp_path, tiny_pipeline_dirs):
    from ncppo.evaluation.generation import GenerationSpec
    from ncppo.evaluation.image_sets import generate_image_set, read_manifest
    from ncppo.evaluation.prompts import PromptSet
    from ncppo.models.loading import load_pipeline

    model = tiny_pipeline_dirs["sd15"]
    pipe = load_pipeline(model)
    prompts = PromptSet(["a red circle", "a blue square"])
    spec = GenerationSpec(tuple(prompts.prompts), num_inference_steps=1, batch_size=2, height=32, width=32)
    with pytest.raises(OutputDirError, match="is inside the input"):
        generate_image_set(pipe, prompts, model / "samples", spec, model=str(model), progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="no ncppo command wrote"):
        generate_image_set(pipe, prompts, other, spec, progress=False)
    assert (other / "notes.txt").read_text() == "mine"
    out = tmp_path / "gen"
    assert generate_image_set(pipe, prompts, out, spec, progress=False)["generated"] == 2
    (out / "images" / "p00001-i00.png").unlink()
    assert generate_image_set(pipe, prompts, out, spec, progress=False) == {"generated": 1, "reused": 1, "total": 2}
    assert generate_image_set(pipe, prompts, other, spec, progress=False, overwrite=True)["generated"] == 2
    assert not (other / "notes.txt").exists() and len(read_manifest(other)) == 2
    # from the command line
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    cli = ["generate", "--model", str(model), "--out", str(tmp_path / "foreign"), "--prompts",
           str(tmp_path / "prompts.txt"), "--steps", "1", "--height", "32", "--width", "32"]
    assert main(cli) == 2 and (tmp_path / "foreign" / "notes.txt").is_file()
    assert main([*cli, "--overwrite"]) == 0 and len(read_manifest(tmp_path / "foreign")) == 1
    assert main(cli) == 0  # its own output now: a rerun reuses it


# -- 2. a uid with two different images: a resumed cache equals an uninterrupted one ---------------------

KILL_DURING_CACHE = textwrap.dedent("""
    import os, signal, sys
    from ncppo.data import cache
    from ncppo.cli import main

    real, calls = cache._encode, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    cache._encode = dying
    sys.exit(main(sys.argv[2:]))
""")


def test_a_resumed_cache_decides_uid_conflicts_like_an_uninterrupted_one(tmp_path, tiny_pipeline_dirs):
    from safetensors.torch import load_file

    spec = [(f"prompt {k}", f"u{k}", f"v{k}", k % 2) for k in range(8)]
    rows = comparisons_table(comparisons(spec), {u: image_for(u) for k in range(8) for u in (f"u{k}", f"v{k}")})
    rows = rows.to_pylist()
    rows[6]["image_0_uid"] = "u1"  # uid u1 again (first at row 1, in shard 0), with row 6's other image
    src = _write_rows(tmp_path / "src", rows)
    args = ["data", "cache", "--model", str(tiny_pipeline_dirs["sd15"]), "--resolution", "16",
            "--pairs-per-shard", "4", "--batch-size", "2", str(src)]
    assert main([*args, str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "index.json").read_text())
    assert whole["cached_pairs"] == 7 and whole["skipped_pairs"] == 1
    # killed at the first encoding of shard 1, after shard 0 is written: then resumed
    run = subprocess.run([sys.executable, "-c", KILL_DURING_CACHE, "3", *args, str(tmp_path / "resumed")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "resumed").glob("shard-*.safetensors")) == ["shard-00000.safetensors"]
    assert main([*args, str(tmp_path / "resumed")]) == 0
    resumed = json.loads((tmp_path / "resumed" / "index.json").read_text())
    assert (resumed["cached_pairs"], resumed["skipped_pairs"]) == (7, 1)
    assert [s["pairs"] for s in resumed["shards"]] == [s["pairs"] for s in whole["shards"]] == [4, 3]
    for shard in whole["shards"]:
        a, b = load_file(str(tmp_path / "whole" / shard["file"])), load_file(str(tmp_path / "resumed" / shard["file"]))
        assert a["pair_index"].tolist() == b["pair_index"].tolist()
        for key in a:
            np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), atol=1e-6)


def test_uid_conflicts_do_not_depend_on_the_reading_order(tmp_path):
    rows = comparisons_table(comparisons(SPEC), {u: image_for(u) for u in "xqyabc"}).to_pylist()
    rows[3]["jpg_1"] = image_for("other")  # uid 'a' (first at row 2 column jpg_0) with other bytes
    src = _write_rows(tmp_path / "src", rows)
    forward, backward = PreferencePairs(src), PreferencePairs(src)
    ids_forward = next(forward.batches(4, 8, shuffle=False)).ids
    ids_backward = [i for k in (3, 2, 1, 0) if (b := backward.collate([k], 8)) is not None for i in b.ids]
    assert sorted(ids_forward) == sorted(ids_backward) == [0, 1, 2]
    for pairs in (forward, backward):
        (example,) = pairs.skips.examples["bad image"]
        assert "row 3 column jpg_1: image uid 'a' has different image bytes than at" in example
        assert "row 2 column jpg_0" in example


def test_uid_checks_read_no_image_twice(tmp_path, monkeypatch):
    rows = comparisons_table(comparisons(SPEC), {u: image_for(u) for u in "xqyabc"}).to_pylist()
    src = _write_rows(tmp_path / "src", rows)
    reads = []

    def counting(pairs):
        real = pairs.source.rows
        monkeypatch.setattr(pairs.source, "rows", lambda i, r, c=None: reads.append(list(r)) or real(i, r, c))
        return pairs

    pairs = counting(PreferencePairs(src))
    assert pairs.collate([0, 1], 8) is not None and reads == [[0, 1]]  # uids first seen here: one read
    digests = pairs.first_image_digests([0, 1])
    assert set(digests) == {"0"}  # x (slot 0) occurs again; q, y do not
    reads.clear()
    assert pairs.collate([2, 3], 8) is not None and reads == [[2, 3]]  # 'a' at rows 2 and 3: in hand together
    reads.clear()
    later = counting(PreferencePairs(src))
    assert later.collate([3], 8) is not None and reads == [[3], [2]]  # its first occurrence unknown: read it
    resumed = counting(PreferencePairs(src))
    resumed.remember_first_image_digests({**digests, **later.first_image_digests([2])})
    reads.clear()
    assert resumed.collate([3], 8) is not None and reads == [[3]]  # a resumed cache knows it from the shard


# -- 3. decompression bombs, and corrupt images that data filter copies -----------------------------------

def test_a_decompression_bomb_is_a_bad_image_not_a_gigabyte(tmp_path, monkeypatch):
    bomb = _bomb()
    assert len(bomb) < 700
    rows = comparisons_table(comparisons(SPEC), {u: image_for(u) for u in "xqyabc"}).to_pylist()
    rows[1]["jpg_1"] = bomb
    src = _write_rows(tmp_path / "src", rows)
    pairs = PreferencePairs(src)
    assert next(pairs.batches(4, 8, shuffle=False)).ids == [0, 2, 3]
    (example,) = pairs.skips.examples["bad image"]
    assert "x.parquet row 1 column jpg_1: image too large" in example and "10000x10000" in example
    with pytest.raises(DataError, match="row 1 column jpg_1: image too large"):
        list(PreferencePairs(src, on_bad_row="error").batches(4, 8, shuffle=False))
    # the limit is configurable: per reader, and for the process
    small = PreferencePairs(src, max_image_pixels=24 * 32 - 1)
    assert small.collate([0], 8) is None and "over the limit of 767 px" in small.skips.examples["bad image"][0]
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 100)
    assert PreferencePairs(src).collate([0], 8) is None


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_image_headers_are_checked_without_decoding(fmt):
    from ncppo.data.images import inspect_image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, fmt)
    data = buf.getvalue()
    assert inspect_image(data) is None
    assert inspect_image(data[: len(data) // 2]) is not None  # truncated
    assert inspect_image(b"\0" * 8 + data[8:]).startswith("not a JPEG, PNG or WebP image")
    assert inspect_image(data, max_pixels=48 * 64 - 1).startswith("image too large")
    assert inspect_image(None) == "no image data"
    assert inspect_image(_bomb()).startswith("image too large (the header claims 10000x10000")


def test_filter_counts_the_bad_images_it_copies(tmp_path, capsys):
    rows = comparisons_table(comparisons(SPEC), {u: image_for(u) for u in "xqyabc"}).to_pylist()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rows[1]["jpg_1"] = jpeg_bytes(noise)[:-400]  # truncated: its header still parses
    rows[3]["jpg_0"] = b"GIF89a not an image"
    src = _write_rows(tmp_path / "src", rows)
    assert main(["data", "filter", str(src), str(tmp_path / "out"), "--min-wins", "1", "--pairs", "all"]) == 0
    printed = capsys.readouterr().out
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["bad_images"]["total"] == 2
    assert stats["bad_images"]["by_reason"] == {"truncated JPEG": 1, "not a JPEG, PNG or WebP image": 1}
    assert "x.parquet row 1 column jpg_1: truncated JPEG" in stats["bad_images"]["examples"]["truncated JPEG"][0]
    assert "bad images copied (by header; readers skip them): 2" in printed
    with pytest.raises(DataError, match="row 1 column jpg_1: truncated JPEG"):
        filter_dataset(src, tmp_path / "strict", min_wins=1, pairs="all", on_bad_row="error", progress=False)
    assert not (tmp_path / "strict").exists()


# -- 4. latent cache integrity ---------------------------------------------------------------------------

@pytest.fixture
def built_cache(tmp_path, tiny_pipeline_dirs):
    src = write_dataset(tmp_path / "src", [(f"p{k}", f"u{k}", f"v{k}", k % 2) for k in range(6)])
    args = ["data", "cache", "--model", str(tiny_pipeline_dirs["sd15"]), "--resolution", "16",
            "--pairs-per-shard", "2", str(src), str(tmp_path / "c")]
    assert main(args) == 0
    return tmp_path / "c", args


def _shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}


def _same_tensors(folder, good: dict) -> bool:
    """The shards hold the tensors of ``good`` (bytes can differ: safetensors orders its metadata freely)."""
    from safetensors.torch import load, load_file

    for name, data in good.items():
        a, b = load(data), load_file(str(folder / name))
        if a.keys() != b.keys() or any(not (a[k] == b[k]).all() for k in a):
            return False
    return True


def test_a_truncated_shard_is_named_and_a_rerun_repairs_it(built_cache, capsys, monkeypatch):
    from ncppo.data import cache as cache_module
    from ncppo.data.cache import LatentCache

    folder, args = built_cache
    good = _shard_bytes(folder)
    shard = folder / "shard-00001.safetensors"
    shard.write_bytes(good[shard.name][:-100])
    with pytest.raises(StateError, match=r"shard-00001.safetensors: .* bytes, the index says .*rerun `ncppo data cache`"):
        LatentCache(folder)
    with monkeypatch.context() as patch:  # a repair that is interrupted leaves the cache marked incomplete
        patch.setattr(cache_module, "_encode", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            main(args)
    with pytest.raises(DataError, match="incomplete"):
        LatentCache(folder)
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.safetensors")}
    assert main(args) == 0
    assert "shard-00001.safetensors: " in capsys.readouterr().out  # reported, rebuilt
    assert _same_tensors(folder, good)
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in folder.glob("shard-*.safetensors") if p != shard)
    assert len(list(LatentCache(folder, verify=True).batches(2))) == 3


def test_overwritten_shard_bytes_are_caught_before_training(built_cache):
    from ncppo.data.cache import LatentCache

    folder, args = built_cache
    good = _shard_bytes(folder)
    shard = folder / "shard-00002.safetensors"
    data = bytearray(good[shard.name])
    data[-64:] = b"\x7f" * 64  # same size, garbage tensor values
    shard.write_bytes(bytes(data))
    with pytest.raises(StateError, match="shard-00002.safetensors: its bytes do not match"):
        LatentCache(folder, verify=True)
    cache = LatentCache(folder)  # the cheap check (sizes) passes, the shard's load does not
    with pytest.raises(StateError, match="shard-00002.safetensors: its bytes do not match.*rerun"):
        cache.load_shard(2)
    assert main(args) == 0 and _shard_bytes(folder)[shard.name] == bytes(data)  # without --verify: sizes only
    assert main([*args, "--verify"]) == 0 and _same_tensors(folder, good)
    assert len(list(LatentCache(folder, verify=True).batches(2))) == 3
    # a lost checksum file: the shard is checked against index.json, not trusted
    shard.write_bytes(bytes(data))
    (folder / "shard-00002.check.json").unlink()
    assert main(args) == 0 and _same_tensors(folder, good)


def test_a_damaged_index_is_one_error_and_a_rerun_rewrites_it(built_cache, capsys):
    from ncppo.data.cache import LatentCache

    folder, args = built_cache
    index = (folder / "index.json").read_text()
    (folder / "index.json").write_text(index[: len(index) // 2])
    with pytest.raises(StateError, match=r"index.json: damaged \(JSONDecodeError.*rerun `ncppo data cache`"):
        LatentCache(folder)
    assert main(args) == 0 and (folder / "index.json").read_text() == index
    (folder / "config.json").write_text("{")
    assert main(args) == 2
    assert "config.json: damaged" in capsys.readouterr().err


# -- 6. tracebacks where a message belongs -----------------------------------------------------------------

def _corrupt_page(path, group: int, column_name: str) -> None:
    meta = pq.ParquetFile(path).metadata.row_group(group)
    column = next(meta.column(c) for c in range(meta.num_columns) if meta.column(c).path_in_schema == column_name)
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    data = bytearray(path.read_bytes())
    for k in range(column.data_page_offset + 10, start + column.total_compressed_size):  # this column's pages only
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_parquet_page_names_the_file_and_row_group(tmp_path):
    spec = [(f"caption {k}", f"u{k}", f"v{k}", 1) for k in range(8)]
    src = write_dataset(tmp_path / "src", spec, rows_per_shard=8)
    _corrupt_page(src / "train-00000.parquet", 1, "caption")
    with pytest.raises(DataError, match=r"train-00000.parquet: cannot read row group 1 \(rows 2-3\), column\(s\) "
                                        r"caption.*the file is damaged") as err:
        PreferencePairs(src)
    assert "\n" not in str(err.value)
    # a damaged image page shows when a batch reads it: the same one-line error, from the command line too
    src = write_dataset(tmp_path / "src2", spec, rows_per_shard=8)
    _corrupt_page(src / "train-00000.parquet", 2, "jpg_1")
    pairs = PreferencePairs(src)
    assert pairs.collate([0, 1], 8) is not None
    with pytest.raises(DataError, match=r"cannot read row group 2 \(rows 4-5\), column\(s\) jpg_1"):
        pairs.collate([4], 8)
    assert main(["data", "stats", str(src), "--check-images"]) == 2


def test_a_label_that_is_not_a_number(tmp_path):
    (tmp_path / "images").mkdir()
    for uid in "abcd":
        (tmp_path / "images" / f"{uid}.jpg").write_bytes(image_for(uid))
    (tmp_path / "pairs.csv").write_text("caption,image_0_uid,image_1_uid,label_0,label_1\n"
                                        "red,a,b,1,0\nred,c,d,yes,0\nred,a,d,0,1\n")
    pairs = PreferencePairs(tmp_path / "pairs.csv")
    assert len(pairs) == 2 and pairs.skips.examples["label not a number (columns label_0/label_1)"] == [
        f"{tmp_path / 'pairs.csv'} row 1"]
    with pytest.raises(DataError, match=r"pairs.csv row 1: label not a number"):
        PreferencePairs(tmp_path / "pairs.csv", on_bad_row="error")
    (tmp_path / "pairs.csv").write_text("caption,image_0_uid,image_1_uid,label_0,label_1\nred,a,b,yes,no\n")
    with pytest.raises(DataError, match=r"pairs.csv: column 'label_0' holds no numbers \(row 0 is 'yes'\)"):
        PreferencePairs(tmp_path / "pairs.csv")


# -- 7. (issue 18) a parquet without image columns -----------------------------------------------------------

def test_a_parquet_without_image_columns_is_a_named_error(tmp_path, capsys):
    table = comparisons_table(comparisons(SPEC)).drop_columns(["jpg_0", "jpg_1"])
    (tmp_path / "d").mkdir()
    pq.write_table(table, tmp_path / "d" / "x.parquet")
    with pytest.raises(DataError, match=r"x.parquet: missing column\(s\) 'jpg_0', 'jpg_1'"):
        PreferencePairs(tmp_path / "d")
    assert main(["data", "stats", str(tmp_path / "d"), "--check-images"]) == 2
    err = capsys.readouterr().err
    assert "missing column(s) 'jpg_0', 'jpg_1'" in err and "Traceback" not in err


def test_no_leftover_is_read_as_data(tmp_path):
    src = write_dataset(tmp_path / "src", SPEC)
    for prefix in (".tmp-", ".new-", ".old-"):  # unfinished or superseded writes inside a source folder
        write_dataset(src / f"{prefix}part-0123abcd-1", SPEC)
    assert len(PreferencePairs(src)) == len(SPEC)
    assert os.path.isdir(src / ".new-part-0123abcd-1")
    assert len(PreferencePairs(src / ".new-part-0123abcd-1")) == len(SPEC)  # named as a source itself: read


# -- 12.11: a full disk while writing a dataset or a cache: one line, and what was there is kept -------------
# the errors are the ones pyarrow and safetensors raise on a full tmpfs (never point them at /dev/full: pyarrow
# removes a path it failed to write, safetensors renames its file onto the path)
PYARROW_FULL = OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("ncppo: error:")]
    return line


def test_a_full_disk_during_filter_keeps_the_old_output(tmp_path, monkeypatch, capsys):
    import ncppo.data.writer as writer

    src = write_dataset(tmp_path / "src", SPEC)
    out = tmp_path / "out"
    filter_dataset(src, out, min_wins=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(writer.pq, "write_table", lambda *a, **k: (_ for _ in ()).throw(PYARROW_FULL))
    assert main(["data", "filter", str(src), str(out), "--min-wins", "2"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"ncppo: error: no space left on device while writing {out} (") and " MiB free there); " in line
    assert line.endswith(f"{out} is as it was: free some space and run the same command again")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no scratch folder left


def test_a_full_disk_during_cache_keeps_the_finished_shards_and_a_rerun_resumes(built_cache, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    folder, args = built_cache
    (folder / "index.json").unlink()
    for k in (1, 2):
        (folder / f"shard-0000{k}.safetensors").unlink()
    kept = (folder / "shard-00000.safetensors").stat().st_mtime_ns
    real = safetensors.torch.save_file
    calls = []

    def full_on_the_second(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise SafetensorError(SAFETENSORS_FULL)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_on_the_second)
    assert main(args) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"ncppo: error: no space left on device while writing {folder / 'shard-00002.safetensors'} (")
    assert line.endswith("the shards written before it are kept and a rerun resumes from them: free some space and "
                         "run the same command again")
    assert sorted(p.name for p in folder.glob("*shard-*.safetensors")) == ["shard-00000.safetensors",
                                                                            "shard-00001.safetensors"]
    monkeypatch.undo()
    assert main(args) == 0 and json.loads((folder / "index.json").read_text())["cached_pairs"] == 6
    assert (folder / "shard-00000.safetensors").stat().st_mtime_ns == kept
