"""The paper's Table 1, Fig 4 and Table 2 at toy scale, over several seeds.

For each seed, a toy world (the shared cached base model; pairs, annotators, training and evaluation
seeded by the seed) trains the six methods on the original and the NCP-filtered data at equal time
budgets, plus NCP-DPO on Table 2's two other variants, and evaluates them all on every caption with the
oracle reward. This script then pools the seeds: win rates over (seed, prompt) with bootstrap intervals
over the same units, per-seed rates, time to quality, and mean curves.

    python benchmarks/toy_reproduction.py            # 3 seeds, 60 s per run: about 90 min on 2 CPU cores
    python benchmarks/toy_reproduction.py --seeds 0 --minutes 0.2   # a quick look

Writes benchmarks/results/toy_reproduction.json, .md and .png; the worlds go to --out. Keep the machine
otherwise idle: the budgets are wall-clock training time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from ncppo.evaluation import paired_win_rate
from ncppo.io import atomic_write_text
from ncppo.toy.config import FilterConfig, ToyConfig, TrainStageConfig
from ncppo.toy.stages import ToyWorld

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("x>y", "x>y,x>z", "x>y,y>z")


def world_config(seed: int, minutes: float) -> ToyConfig:
    base = ToyConfig()
    return ToyConfig(
        pretrain=base.pretrain,  # one base model for every seed (pretraining is not what is compared)
        pairs=base.pairs,
        filter=FilterConfig(variants=VARIANTS),
        train=TrainStageConfig(datasets=("original", "filtered"), minutes_per_run=minutes, seed=seed,
                               extra_runs=("x>y,x>z/ncp-dpo", "x>y,y>z/ncp-dpo")),
        eval=base.eval,
        seed=seed,
    )


def pooled(results: list[dict]) -> list[dict]:
    """Each comparison pooled over seeds: units are (seed, prompt), so the interval covers seed noise too."""
    rows = []
    for index, first in enumerate(results[0]["comparisons"]):
        a, b = first["a"], first["b"]
        ra, rb, groups, per_seed, ttq = [], [], [], [], []
        for s, res in enumerate(results):
            row = res["comparisons"][index]
            assert (row["a"], row["b"]) == (a, b)
            ra += res["models"][a]["rewards"]
            rb += res["models"][b]["rewards"]
            groups += [s * 100_000 + p for p in res["models"][a]["prompt_ids"]]
            per_seed.append(row["rate"])
            ttq.append(row.get("time_to_quality"))
        win = paired_win_rate(ra, rb, groups=groups, n_boot=4000)
        entry = {"a": a, "b": b, "kind": first["kind"], **win.to_dict(), "per_seed": per_seed,
                 "mean_a": float(np.mean(ra)), "mean_b": float(np.mean(rb))}
        if first["kind"] == "NCP vs noise space":
            entry["time_to_quality_per_seed"] = ttq
        rows.append(entry)
    return rows


def mean_curves(results: list[dict]) -> dict[str, list[dict]]:
    """Per run, the curve averaged over seeds point by point (points are at the same budget fractions)."""
    out = {}
    for name in results[0]["curves"]:
        curves = [r["curves"][name] for r in results]
        n = min(len(c) for c in curves)
        out[name] = [{"train_seconds": statistics.fmean(c[i]["train_seconds"] for c in curves),
                      "mean": statistics.fmean(c[i]["mean"] for c in curves)} for i in range(n)]
    return out


def markdown(summary: dict) -> str:
    lines = ["# Toy reproduction (Table 1, Fig 4, Table 2 at toy scale)", "",
             f"Command: `{summary['command']}`; {len(summary['seeds'])} seeds, {summary['minutes_per_run'] * 60:.0f} s "
             f"of training per run, {summary['wall_minutes']:.0f} min wall in all; {summary['machine']}.", "",
             "Win rates of B over A by the oracle reward on every caption, ties half; pooled over seeds with 95% "
             "bootstrap intervals over (seed, prompt).", "",
             "| B vs A | kind | pooled win rate [95% CI] | per seed | mean reward A -> B |", "|---|---|---|---|---|"]
    for r in summary["comparisons"]:
        seeds = ", ".join(f"{100 * x:.0f}%" for x in r["per_seed"])
        lines.append(f"| {r['b']} vs {r['a']} | {r['kind']} | {100 * r['rate']:.1f}% [{100 * r['low']:.1f}, "
                     f"{100 * r['high']:.1f}] | {seeds} | {r['mean_a']:.4f} -> {r['mean_b']:.4f} |")
    lines += ["", "Time to quality (NCP-X's training time to reach X's final reward, as a fraction of X's budget; "
              "per seed):", ""]
    for r in summary["comparisons"]:
        if "time_to_quality_per_seed" in r:
            vals = ", ".join(v if isinstance(v, str) else ("never" if v is None else f"{v:.2f}")
                             for v in r["time_to_quality_per_seed"])
            lines.append(f"- {r['b']} vs {r['a']}: {vals}")
    lines += ["", "Mean reward per model (mean over seeds of each seed's mean):", "", "| model | mean | per seed |",
              "|---|---|---|"]
    for name, per_seed in summary["model_means"].items():
        lines.append(f"| {name} | {statistics.fmean(per_seed):.4f} | {', '.join(f'{x:.4f}' for x in per_seed)} |")
    lines += ["", "![mean curves](toy_reproduction.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=1.0, help="training minutes per run (equal budgets)")
    parser.add_argument("--out", default="outputs/toy_reproduction")
    args = parser.parse_args()
    start = time.perf_counter()
    results = []
    for seed in args.seeds:
        world = ToyWorld(Path(args.out) / f"seed-{seed}", world_config(seed, args.minutes))
        world.run()
        results.append(json.loads((world.out / "eval" / "results.json").read_text()))
    summary = {
        "command": "python benchmarks/toy_reproduction.py " + " ".join(
            [f"--seeds {' '.join(map(str, args.seeds))}", f"--minutes {args.minutes:g}"]),
        "seeds": args.seeds, "minutes_per_run": args.minutes, "wall_minutes": (time.perf_counter() - start) / 60,
        "machine": f"{platform.processor() or platform.machine()}, torch threads as set by torch",
        "comparisons": pooled(results),
        "model_means": {name: [r["models"][name]["mean"] for r in results] for name in results[0]["models"]},
        "curves_mean": mean_curves(results),
        "filter": [json.loads((Path(args.out) / f"seed-{s}" / "filtered" / "stats.json").read_text())["after"]
                   for s in args.seeds],
    }
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "toy_reproduction.json", json.dumps(summary, indent=1))
    atomic_write_text(RESULTS / "toy_reproduction.md", markdown(summary))
    from ncppo.plots import save_reward_curves

    base_curve = next(iter(summary["curves_mean"].values()))[0]["mean"]
    save_reward_curves(summary["curves_mean"], RESULTS / "toy_reproduction.png", "mean oracle reward (mean of seeds)",
                       base_curve)
    print(markdown(summary))


if __name__ == "__main__":
    main()
