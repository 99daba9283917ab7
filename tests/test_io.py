"""Atomic folders end in the old or the new state, whatever point a SIGKILL hits; leftovers are cleaned."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ncppo import io as nio
from ncppo.errors import OutputDirError

# Replaces ``target`` (holding v.txt = "old", unless it does not exist) with a folder holding v.txt = "new",
# and SIGKILLs itself at step ``k`` of the swap: step n is the n-th os.replace / _exchange call,
# "block" is inside the with-block, "remove" is the removal of the old folder.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import ncppo.io as nio

    target, mode, where = sys.argv[1], sys.argv[2], sys.argv[3]
    calls = {"n": 0}

    def step(real):
        def wrapped(*args):
            calls["n"] += 1
            if str(calls["n"]) == where:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args)
        return wrapped

    os.replace = step(os.replace)
    nio._exchange = (lambda a, b: False) if mode == "fallback" else step(nio._exchange)
    if where == "remove":
        nio._remove = lambda path: os.kill(os.getpid(), signal.SIGKILL)
    with nio.atomic_directory(target) as tmp:
        (tmp / "v.txt").write_text("new")
        if where == "block":
            os.kill(os.getpid(), signal.SIGKILL)
    print("finished")
""")


def _run_killer(target, mode, where):
    run = subprocess.run([sys.executable, "-c", KILLER, str(target), mode, where], capture_output=True, text=True,
                         timeout=60)
    return run


def _state(target):
    return (target / "v.txt").read_text() if target.is_dir() else None


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".tmp-", ".new-", ".old-")))


@pytest.mark.parametrize(("mode", "where", "right_after", "recovered"), [
    ("exchange", "block", "old", "old"),      # killed while writing: the scratch folder is unfinished
    ("exchange", "1", "old", "old"),          # finished, before it was marked finished (.tmp- -> .new-)
    ("exchange", "2", "old", "old"),          # marked finished, before the swap: the old state stays
    ("exchange", "3", "new", "new"),          # after the one-step swap, before the old folder is renamed .old-
    ("exchange", "remove", "new", "new"),     # while removing the old folder
    ("fallback", "2", "old", "old"),          # two renames: before the first
    ("fallback", "3", None, "new"),           # between the two renames: no target until recovery
    ("fallback", "remove", "new", "new"),
])
def test_a_sigkill_at_each_point_ends_in_the_old_or_the_new_state(tmp_path, mode, where, right_after, recovered):
    target = tmp_path / "out"
    target.mkdir()
    (target / "v.txt").write_text("old")
    run = _run_killer(target, mode, where)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert _state(target) == right_after
    assert _leftovers(tmp_path)  # the kill left something behind
    nio.recover_atomic(target)
    assert _state(target) == recovered
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in target.iterdir()) == ["v.txt"]


def test_a_kill_before_the_first_output_is_in_place_is_recovered_by_the_next_write(tmp_path):
    target = tmp_path / "out"
    run = _run_killer(target, "exchange", "2")  # before .new- -> out: there was no old folder
    assert run.returncode == -signal.SIGKILL and not target.exists()
    with nio.atomic_directory(tmp_path / "other") as tmp:  # another target's write leaves it alone
        (tmp / "x").write_text("x")
    assert len(_leftovers(tmp_path)) == 1
    with nio.atomic_directory(target) as tmp:  # the next write of the same target restores, then replaces
        assert _state(target) == "new"
        (tmp / "v.txt").write_text("newer")
    assert _state(target) == "newer" and _leftovers(tmp_path) == []


def test_uninterrupted_swaps_both_ways(tmp_path, monkeypatch):
    target = tmp_path / "out"
    for k, exchange in enumerate([True, False, True]):
        if not exchange:
            monkeypatch.setattr(nio, "_exchange", lambda a, b: False)
        with nio.atomic_directory(target) as tmp:
            (tmp / "v.txt").write_text(str(k))
        assert _state(target) == str(k) and _leftovers(tmp_path) == []
        monkeypatch.undo()


def test_an_exception_in_the_block_keeps_the_old_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "v.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), nio.atomic_directory(target) as tmp:
        (tmp / "v.txt").write_text("new")
        raise KeyboardInterrupt
    assert _state(target) == "old" and _leftovers(tmp_path) == []


def test_leftovers_of_live_writers_and_of_other_names_are_kept(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".tmp-out-0123abcd-{sleeper.pid}"
        live.mkdir()
        dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout.strip()
        dead = tmp_path / f".tmp-out-0123abcd-{dead_pid}"
        dead.mkdir()
        legacy = tmp_path / ".old-out-0123abcd"  # the old naming, without a pid
        legacy.mkdir()
        other = tmp_path / f".tmp-out-2-0123abcd-{dead_pid}"  # a leftover of the target "out-2"
        other.mkdir()
        (tmp_path / "out").mkdir()
        assert "removed 2" in nio.recover_atomic(tmp_path / "out")
        assert live.exists() and other.exists() and not dead.exists() and not legacy.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_atomic_write_text_removes_stale_temporaries(tmp_path):
    (tmp_path / ".tmp-a.json-0123abcd-999999999").write_text("half")  # no such process
    (tmp_path / ".tmp-a.json-0123abcd").write_text("half")
    nio.atomic_write_text(tmp_path / "a.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_guard_sees_a_recovered_output(tmp_path):
    # a killed `data filter` between its two renames: OUT is missing, its finished .new- folder is beside it
    out = tmp_path / "out"
    ready = tmp_path / ".new-out-0123abcd-999999999"
    ready.mkdir()
    nio.mark_output_dir(ready, "train")
    with pytest.raises(OutputDirError, match="an output of `ncppo train`"):
        nio.guard_output_dir(out, "data filter")  # without recovery it would look new and be overwritten
    assert nio.output_owner(out) == "train"
    assert nio.guard_output_dir(out, "train") == out.resolve()


def test_guard_rules(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.parquet").write_text("x")
    for out, message in [(src, "is the input"), (src / "sub", "is inside"), (tmp_path, "contains")]:
        with pytest.raises(OutputDirError, match=message):
            nio.guard_output_dir(out, "data filter", inputs=[src])
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="is a file"):
        nio.guard_output_dir(tmp_path / "file", "data filter")
    with pytest.raises(OutputDirError, match="no ncppo command wrote"):
        nio.guard_output_dir(src, "data filter")
    assert nio.guard_output_dir(src, "data filter", overwrite=True) == src.resolve()
    (tmp_path / "mine").mkdir()
    nio.mark_output_dir(tmp_path / "mine", "data filter")
    assert nio.guard_output_dir(tmp_path / "mine", "data filter") == (tmp_path / "mine").resolve()
    assert json.loads((tmp_path / "mine" / nio.OUTPUT_MARKER).read_text()) == {"command": "data filter"}


def test_clear_output_dir(tmp_path):
    (tmp_path / "out" / "deep").mkdir(parents=True)
    nio.clear_output_dir(tmp_path / "out")
    nio.clear_output_dir(tmp_path / "missing")
    assert os.listdir(tmp_path) == []


def test_atomic_write_bytes_and_atomic_file(tmp_path):
    target = tmp_path / "weights.bin"
    nio.atomic_write_bytes(target, b"\x00\x01new")
    assert target.read_bytes() == b"\x00\x01new"
    with pytest.raises(RuntimeError, match="writer failed"), nio.atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"\x00\x01new"  # the old file, and no temporary left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]
    with nio.atomic_file(target) as tmp:  # a writer that takes a path (safetensors, PIL)
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-weights.bin-")
        tmp.write_bytes(b"v2")
    assert target.read_bytes() == b"v2" and sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]
    nio.atomic_write_text(tmp_path / "t.txt", "é")
    assert (tmp_path / "t.txt").read_bytes() == "é".encode()


def test_setting_differences():
    old = {"a": 1, "b": float("nan"), "c": "x", "p": "rel"}
    new = {"a": 1.0, "b": float("nan"), "c": "y", "d": 5, "e": 2, "p": "/abs/rel", "skip": 9}
    diffs = nio.setting_differences(old, new, ignore={"skip"}, defaults={"d": 5},
                                    normal=lambda k, v: f"/abs/{v}" if k == "p" and not str(v).startswith("/") else v)
    assert diffs == ["c: 'x' -> 'y'", "e: None -> 2"]  # 1 == 1.0, NaN == NaN, d at its default, p one path
