"""Fault figures for issue 12 ("Nothing lost, nobody let in"), measured, not asserted (the tests in
``tests/test_faults_*.py`` and ``tests/test_io.py`` assert each fault at exact code points; this script adds
kills at random times and the costs a hostile input no longer has).

1. **Random SIGKILLs of ``data filter`` rewriting its own output**: a child reruns the filter into the same
   folder in a loop (alternating rules) and is SIGKILLed at a random time; then the next ``data filter``
   runs. Counted: the output whole right after the kill (old or new, its rows matching its ``stats.json``),
   left for the next run to complete, lost; leftovers (``.tmp-``/``.new-``/``.old-``) right after the kill
   and after the next run; the source unchanged.
2. **A decompression bomb** (a ~630-byte JPEG claiming 10000x10000 px) through the training reader, in a
   fresh process: the peak memory it adds, and the skip it is counted as.
3. **The study server under a declared 256 MiB body**: the answer, the time to it, the server process's
   memory before and after, and the latency of another annotator's ``/api/next`` while that body is open.

Writes ``benchmarks/results/faults.json``.

    python benchmarks/faults.py [--kills 20] [--seed 0] [--out benchmarks/results/faults.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from ncppo.io import atomic_write_text  # noqa: E402
from ncppo.study.create import create_study  # noqa: E402
from ncppo.study.server import running_server  # noqa: E402
from tests.data_helpers import write_dataset  # noqa: E402
from tests.study_helpers import fake_generation  # noqa: E402

FILTER_LOOP = textwrap.dedent("""
    import sys
    from ncppo.data.writer import filter_dataset
    print("READY", flush=True)
    k = 0
    while True:
        filter_dataset(sys.argv[1], sys.argv[2], min_wins=1 + k % 2, progress=False)
        k += 1
""")

BOMB = textwrap.dedent("""
    import io, json, resource
    from PIL import Image
    from ncppo.data.pairs import PreferencePairs
    from ncppo.data.pickapic import comparisons_table
    import pyarrow.parquet as pq, sys
    sys.path.insert(0, sys.argv[2])
    from tests.data_helpers import comparisons, image_for

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG", quality=10)
    data = bytearray(buf.getvalue())
    sof = data.find(b"\\xff\\xc0")
    data[sof + 5 : sof + 9] = (10000).to_bytes(2, "big") * 2
    spec = [("p", "x", "q", 1, 1), ("p", "x", "y", 1, 5)]
    rows = comparisons_table(comparisons(spec), {u: image_for(u) for u in "xqy"}).to_pylist()
    rows[1]["jpg_1"] = bytes(data)
    import pyarrow as pa, pathlib
    folder = pathlib.Path(sys.argv[1])
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), folder / "x.parquet")
    pairs = PreferencePairs(folder)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    batch = pairs.collate([0, 1], 8)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"bomb_bytes": len(data), "claimed_px": 10000 * 10000, "pairs_in_batch": len(batch.ids),
                      "added_peak_rss_mib": round((after - before) / 1024, 1), "skips": pairs.skips.as_dict()}))
""")


def _digest(folder: Path) -> str:
    h = hashlib.blake2b()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _whole(out: Path) -> bool:
    """The output is a complete filter output: its parquet rows are what its stats.json says."""
    try:
        stats = json.loads((out / "stats.json").read_text())
        rows = sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet"))
    except (OSError, ValueError):
        return False
    return rows == stats["after"]["rows"]


def random_filter_kills(n: int, rng: random.Random, work: Path) -> dict:
    from ncppo.data.writer import filter_dataset

    spec = [(f"p{k % 5}", f"u{k}", f"v{k % 7}", k % 2) for k in range(40)]
    src = write_dataset(work / "src", spec)
    source = _digest(src)
    out = work / "out"
    filter_dataset(src, out, min_wins=1, progress=False)  # every kill hits a rewrite of an existing output
    counts = {"kills": 0, "whole_after_kill": 0, "completed_by_next_run": 0, "lost": 0, "leftovers_after_kill": 0,
              "leftovers_after_next_run": 0,
              "source_changed": 0, "kill_delay_s": []}
    for _ in range(n):
        child = subprocess.Popen([sys.executable, "-c", FILTER_LOOP, str(src), str(out)], stdout=subprocess.PIPE,
                                 text=True, cwd=ROOT)
        assert child.stdout.readline().strip() == "READY"
        delay = rng.uniform(0.0, 1.5)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        counts["kills"] += 1
        counts["kill_delay_s"].append(round(delay, 3))
        counts["leftovers_after_kill"] += len([p for p in work.iterdir() if p.name.startswith(".")])
        if _whole(out):
            counts["whole_after_kill"] += 1
        elif not out.exists() and list(work.glob(".new-out-*")) + list(work.glob(".old-out-*")):
            counts["completed_by_next_run"] += 1  # killed between two renames: the next run restores it
        elif out.exists() or list(work.glob(".*-out-*")):
            counts["lost"] += 1  # a partial folder under the output's name
        filter_dataset(src, out, min_wins=1, progress=False)
        counts["leftovers_after_next_run"] += len([p for p in work.iterdir() if p.name.startswith(".")])
        counts["source_changed"] += _digest(src) != source
    return counts


def bomb(work: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", BOMB, str(work / "bomb"), str(ROOT)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def big_body(work: Path) -> dict:
    a = fake_generation(work / "a", ["p0", "p1"], (200, 0, 0))
    b = fake_generation(work / "b", ["p0", "p1"], (0, 0, 200))
    store = create_study(a, b, work / "study", votes_per_item=2)
    token = store.invite(1)[0]
    with running_server(work / "study") as url:  # in this process: its RSS is the server's
        port = int(url.rsplit(":", 1)[1])
        with httpx.Client(base_url=url, timeout=30) as client:
            client.get("/api/next", params={"token": token})  # warm
            before = _rss_mib(os.getpid())
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                start = time.perf_counter()
                s.sendall(b"POST /api/vote HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 268435456\r\n\r\n" + b" " * (1 << 20))
                answer = s.recv(4096).split(b"\r\n", 1)[0].decode()
                answered_s = time.perf_counter() - start
                lat = time.perf_counter()
                other = client.get("/api/next", params={"token": token}).status_code
                latency = time.perf_counter() - lat
            after = _rss_mib(os.getpid())
    return {"declared_body_mib": 256, "sent_mib": 1, "answer": answer, "answered_in_s": round(answered_s, 4),
            "rss_before_mib": before, "rss_after_mib": after, "other_annotator_next_status": other,
            "other_annotator_next_s": round(latency, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faults.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "kills").mkdir()
        (work / "server").mkdir()
        results = {"filter_random_sigkills": random_filter_kills(args.kills, random.Random(args.seed), work / "kills"),
                   "decompression_bomb": bomb(work),
                   "study_server_256mib_body": big_body(work / "server")}
    results["command"] = f"python benchmarks/faults.py --kills {args.kills} --seed {args.seed}"
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
