"""Load test of the study server on loopback: 20 concurrent annotators x 50 votes each.

Each annotator is a thread with its own HTTP connection: fetch the next item and its two images (blind
names, with the annotator's token), vote, and one vote in ten is sent twice with the same client id (a
retry after a lost response). Afterwards the database must
hold exactly one vote per (annotator, item) and per client id, 1000 in all, and no item more than its
3 annotators. Writes benchmarks/results/study_load.json.

    python benchmarks/study_load.py [--annotators 20] [--votes 50] [--out benchmarks/results/study_load.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parents[1]))
from ncppo.io import atomic_write_text  # noqa: E402
from ncppo.study.create import create_study, open_study  # noqa: E402
from ncppo.study.server import running_server  # noqa: E402
from tests.study_helpers import fake_generation  # noqa: E402


def annotate(url: str, token: str, votes: int, seed: int, latencies: list, errors: list) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=30) as client:
        done = 0
        while done < votes:
            start = time.perf_counter()
            item = client.get("/api/next", params={"token": token}).json()
            latencies.append(("next", time.perf_counter() - start))
            if item.get("done"):
                errors.append(f"{token[:6]}: ran out of items after {done} votes")
                return
            for side in ("left", "right"):
                start = time.perf_counter()
                response = client.get(item[side])
                latencies.append(("image", time.perf_counter() - start))
                if response.status_code != 200 or response.headers["content-type"] != "image/png":
                    errors.append(f"image {response.status_code} {response.text[:80]}")
            body = {"token": token, "assignment_id": item["assignment_id"], "client_id": f"{token}-{done}",
                    **{q: rng.choice(("left", "right", "tie")) for q in ("q1", "q2", "q3")}}
            for _ in range(2 if rng.random() < 0.1 else 1):  # a retry with the same client id
                start = time.perf_counter()
                response = client.post("/api/vote", json=body)
                latencies.append(("vote", time.perf_counter() - start))
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text}")
            done += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument("--votes", type=int, default=50)
    parser.add_argument("--votes-per-item", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "study_load.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_items = args.annotators * args.votes // args.votes_per_item + args.annotators
        prompts = [f"prompt {i}" for i in range(n_items)]
        a, b = fake_generation(tmp / "a", prompts, (200, 0, 0)), fake_generation(tmp / "b", prompts, (0, 0, 200))
        store = create_study(a, b, tmp / "study", votes_per_item=args.votes_per_item)
        tokens = store.invite(args.annotators)
        latencies, errors = [], []
        with running_server(tmp / "study") as url:
            start = time.perf_counter()
            threads = [threading.Thread(target=annotate, args=(url, t, args.votes, i, latencies, errors))
                       for i, t in enumerate(tokens)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
        db = open_study(tmp / "study")
        votes = db.votes()
        per_item = db.conn.execute("SELECT MAX(c) FROM (SELECT COUNT(*) c FROM votes GROUP BY item_id)").fetchone()[0]
        pairs = db.conn.execute("SELECT COUNT(*) FROM (SELECT DISTINCT item_id, annotator FROM votes)").fetchone()[0]
        clients = db.conn.execute("SELECT COUNT(DISTINCT client_id) FROM votes").fetchone()[0]
    expected = args.annotators * args.votes
    ms = {kind: sorted(1000 * s for k, s in latencies if k == kind) for kind in ("next", "image", "vote")}
    result = {
        "command": f"python benchmarks/study_load.py --annotators {args.annotators} --votes {args.votes}",
        "annotators": args.annotators, "votes_each": args.votes, "votes_per_item": args.votes_per_item, "items": n_items,
        "wall_seconds": round(wall, 2), "requests": len(latencies), "requests_per_second": round(len(latencies) / wall, 1),
        "latency_ms": {k: {"median": round(statistics.median(v), 2), "p95": round(v[int(0.95 * (len(v) - 1))], 2)}
                       for k, v in ms.items()},
        "votes_expected": expected, "votes_in_db": len(votes), "distinct_item_annotator": pairs,
        "distinct_client_ids": clients, "max_annotators_per_item": per_item, "errors": errors[:10],
        "ok": len(votes) == expected == pairs == clients and per_item <= args.votes_per_item and not errors,
    }
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if not result["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
