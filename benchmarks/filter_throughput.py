"""Time and peak memory of the NCP filter on metadata shaped like Pick-a-Pic v2.

The table has 959,040 rows: 851,293 decided pairs plus 107,747 ties, over 58,960 prompts with a skewed
(log-normal) number of rows per prompt; each prompt has its own pool of image uids (UUID strings), so
images recur across a prompt's comparisons as in the real data. It is written as 20 metadata-only
parquet shards; a child process then reads the metadata, validates it and selects the absolute winners,
timed stage by stage, and reports its peak RSS (and the RSS after imports, for reference).

    python benchmarks/filter_throughput.py     # writes benchmarks/results/filter_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ncppo.io import atomic_write_text  # noqa: E402

PAIRS, TIES, PROMPTS = 851_293, 107_747, 58_960


def build_metadata(out_dir: Path, seed: int = 0, shards: int = 20) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows = PAIRS + TIES
    weights = rng.lognormal(mean=0.0, sigma=1.2, size=PROMPTS)
    per_prompt = np.maximum(1, np.round(weights / weights.sum() * rows)).astype(np.int64)
    per_prompt[np.argmax(per_prompt)] += rows - per_prompt.sum()  # exact total
    prompt = np.repeat(np.arange(PROMPTS), per_prompt)
    # a pool of images per prompt, about 0.7 images per comparison (plus 2): uids recur
    pool = np.maximum(2, np.round(per_prompt * 0.7).astype(np.int64) + 2)
    base = np.concatenate([[0], np.cumsum(pool)[:-1]])
    a = rng.integers(0, pool[prompt])
    b = (a + 1 + rng.integers(0, pool[prompt] - 1)) % pool[prompt]  # never the same image
    uids = np.array([str(uuid.UUID(int=int(x))) for x in rng.integers(0, 2**63, size=int(pool.sum()))])
    captions = np.array([f"prompt {k}: a detailed painting of a scene number {k} in the style of artist {k % 97}"
                         for k in range(PROMPTS)])
    label0 = rng.integers(0, 2, size=rows).astype(np.float64)
    tie = np.zeros(rows, dtype=bool)
    tie[rng.choice(rows, size=TIES, replace=False)] = True
    label0[tie] = 0.5
    order = rng.permutation(rows)  # rows of a prompt are spread over shards, as in the real dump
    table = pa.table({
        "caption": captions[prompt][order],
        "image_0_uid": uids[base[prompt] + a][order],
        "image_1_uid": uids[base[prompt] + b][order],
        "label_0": label0[order],
        "label_1": (1.0 - label0)[order],
        "created_at": pa.array(rng.integers(1.68e18, 1.70e18, size=rows)[order], pa.timestamp("ns")),
        "user_id": rng.integers(0, 50_000, size=rows)[order],
        "ranking_id": np.arange(rows)[order],
    })
    out_dir.mkdir(parents=True, exist_ok=True)
    step = -(-rows // shards)
    for k in range(shards):
        pq.write_table(table.slice(k * step, step), out_dir / f"train-{k:05d}.parquet")
    return {"rows": rows, "pairs": PAIRS, "ties": TIES, "prompts": PROMPTS, "images": int(pool.sum()),
            "max_rows_per_prompt": int(per_prompt.max()), "median_rows_per_prompt": float(np.median(per_prompt))}


def _peak_rss_bytes() -> int:
    """This process's RSS high-water mark. (``ru_maxrss`` would carry the parent's over fork/exec.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(data_dir: str, reps: int) -> None:
    """Runs in a fresh process: peak RSS covers only reading and filtering."""
    from ncppo.data.filter import select_pairs
    from ncppo.data.pairs import PreferencePairs

    after_imports = _peak_rss_bytes()
    read, select, total, kept = [], [], [], 0
    for _ in range(reps):
        t0 = time.perf_counter()
        pairs = PreferencePairs(data_dir, tie_policy="keep")
        t1 = time.perf_counter()
        selection = select_pairs(pairs.meta, min_wins=2, pairs="latest")
        t2 = time.perf_counter()
        read.append(t1 - t0)
        select.append(t2 - t1)
        total.append(t2 - t0)
        kept = len(selection.rows)
        del pairs, selection
    peak = _peak_rss_bytes()
    print(json.dumps({"read_and_validate_seconds": statistics.median(read),
                      "select_seconds": statistics.median(select), "total_seconds": statistics.median(total),
                      "all_totals": total, "kept_pairs": kept, "peak_rss_bytes": peak,
                      "rss_after_imports_bytes": after_imports}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "filter_throughput.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.reps)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        shape = build_metadata(Path(tmp) / "meta")
        run = subprocess.run([sys.executable, __file__, "--child", str(Path(tmp) / "meta"), "--reps", str(args.reps)],
                             capture_output=True, text=True, check=True)
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    import pyarrow

    report = {
        "benchmark": "filter_throughput",
        "command": "python benchmarks/filter_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "versions": {"python": platform.python_version(), "pyarrow": pyarrow.__version__, "numpy": np.__version__},
        "data": shape,
        "targets": {"seconds": 2.0, "peak_rss_bytes": 2**30},
        **measured,
        "peak_rss_gib": measured["peak_rss_bytes"] / 2**30,
    }
    out = Path(args.out)
    atomic_write_text(out, json.dumps(report, indent=2))
    print(f"read+validate {measured['read_and_validate_seconds']:.2f} s, select {measured['select_seconds']:.2f} s, "
          f"total {measured['total_seconds']:.2f} s (median of {args.reps}); kept {measured['kept_pairs']} pairs; "
          f"peak RSS {report['peak_rss_gib']:.2f} GiB (after imports "
          f"{measured['rss_after_imports_bytes'] / 2**30:.2f} GiB); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
