"""The paper's Table 1, Fig 4 and Table 2 at toy scale, over several seeds.

For each seed, a toy world (the shipped base model; pairs, annotators, training and evaluation seeded by
the seed) trains the six methods on the original and the NCP-filtered data at equal compute (FLOPs, in
DPO-step equivalents: the step counts do not depend on the machine), plus NCP-DPO on Table 2's two other
variants, and evaluates them all on the held-out **test** captions (``ncppo.toy.splits``; compositions the
preference data never shows) with the oracle reward, ``--images`` images per caption. This script then
pools the seeds: win rates over (seed, prompt) with bootstrap intervals over the same units, per-seed
rates, compute to quality, and mean curves with their spread over seeds.

    python benchmarks/toy_reproduction.py                     # 3 seeds
    python benchmarks/toy_reproduction.py --seeds 0 --budget 10 --images 1   # a quick look
    python benchmarks/toy_reproduction.py --backbone dit       # the same on the toy world's DiT base model

The DiT run (issue: transformer backbones, the paper's open question) swaps only the base model: a pixel-space
DiT (``pretrain.backbone: dit``, PixArt's transformer class, DDPM with v-prediction as the U-Net) pretrained by
the same recipe; NCP's encoder is then its first half of blocks. Its results are ``toy_reproduction_dit.*``.

Resumable at two levels. Within a machine, each seed's world is a folder under --out whose finished stages
are reused, so an interrupted run continues where it stopped. Across machines and sessions (a seed takes
about 1.5 CPU-hours), each finished seed's results are committed as
``benchmarks/results/toy_reproduction_seeds/seed-N.json`` (``_dit_seeds`` for the DiT) with the setting and
code version that made them; a later run reuses a committed seed instead of retraining it (one made with
another setting stops the run, naming it; ``--rerun`` retrains), so ``python benchmarks/toy_reproduction.py`` on a fresh clone runs only the seeds
still missing, and two seeds can run side by side (``--seeds 0`` and ``--seeds 1``, one thread each).
Writes benchmarks/results/toy_reproduction.json, .md and .png, pooled over the ``--seeds`` given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.records import code_version, reuse  # noqa: E402
from ncppo.evaluation import paired_win_rate  # noqa: E402
from ncppo.io import atomic_write_text  # noqa: E402
from ncppo.toy.config import FilterConfig, ToyConfig, TrainStageConfig  # noqa: E402
from ncppo.toy.stages import ToyWorld  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("x>y", "x>y,x>z", "x>y,y>z")


def world_config(seed: int, budget: int, images: int, backbone: str = "unet") -> ToyConfig:
    base = ToyConfig()
    return ToyConfig(
        # one base model for every seed (pretraining is not what is compared)
        pretrain=dataclasses.replace(base.pretrain, backbone=backbone),
        pairs=base.pairs,
        filter=FilterConfig(variants=VARIANTS),
        train=TrainStageConfig(datasets=("original", "filtered"), budget_dpo_steps=budget, seed=seed,
                               extra_runs=("x>y,x>z/ncp-dpo", "x>y,y>z/ncp-dpo")),
        # curves on every 6th test caption (10 of 56): a curve point is a mean over 10 x images x seeds images,
        # and the intermediate checkpoints' sampling stays a fifth of the evaluation
        eval=dataclasses.replace(base.eval, split="test", images_per_prompt=images, curve_prompt_stride=6),
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
    """Per run, the curve averaged over seeds point by point (the points are at the same steps in every seed),
    with the spread over seeds as ``low``/``high`` (mean -/+ one standard deviation; none for one seed)."""
    out = {}
    for name in results[0]["curves"]:
        curves = [r["curves"][name] for r in results]
        n = min(len(c) for c in curves)
        points = []
        for i in range(n):
            means = [c[i]["mean"] for c in curves]
            sd = statistics.stdev(means) if len(means) > 1 else None
            point = {"compute": statistics.fmean(c[i]["compute"] for c in curves),
                     "train_seconds": statistics.fmean(c[i]["train_seconds"] for c in curves),
                     "mean": statistics.fmean(means), "per_seed": means}
            if sd is not None:
                point.update(low=point["mean"] - sd, high=point["mean"] + sd)
            points.append(point)
        out[name] = points
    return out


def markdown(summary: dict) -> str:
    backbone = summary.get("backbone", "unet")
    lines = [f"# Toy reproduction (Table 1, Fig 4, Table 2 at toy scale){'' if backbone == 'unet' else ', DiT base model'}",
             "",
             f"Command: `{summary['command']}`; {len(summary['seeds'])} seed(s); every run trained for the FLOPs of "
             f"{summary['budget_dpo_steps']} DPO steps (steps per method: {summary['steps']}); "
             f"{summary['wall_minutes']:.0f} min wall in this sitting; {summary['machine']}.", "",
             "Seeds (each seed's record in `toy_reproduction" + backbone_suffix(backbone) + "_seeds/`): " + "; ".join(
                 f"seed {seed} from code {src['code']}, finished {src['finished']} on {src['machine']}"
                 for seed, src in summary.get("seed_sources", {}).items()) + ".", "",
             "Minutes per stage and seed (the sitting that finished each stage; runs and evaluations finished in an "
             "earlier, interrupted sitting are reused, not counted): " + "; ".join(
                 f"seed {seed}: " + ", ".join(f"{stage} {sec / 60:.1f}" for stage, sec in stages.items())
                 for seed, stages in summary.get("stage_seconds", {}).items()) + ".", "",
             f"Win rates of B over A by the oracle reward on the held-out **test** split ({summary['test_prompts']} "
             f"captions x {summary['images_per_prompt']} images x {len(summary['seeds'])} seed(s)), ties half; pooled "
             "over seeds with 95% bootstrap intervals over (seed, prompt).", "",
             "Base model (mean oracle reward and components, over the seeds' evaluations):", "",
             "| split | mean | object colour | background | shape | quality |", "|---|---|---|---|---|---|",
             *[f"| {split} | {b['mean']:.4f} | {b['object_colour']:.3f} | {b['background']:.3f} | {b['shape']:.3f} | "
               f"{b['quality']:.3f} |" for split, b in summary["base_by_split"].items()], "",
             "| B vs A | kind | pooled win rate [95% CI] | per seed | mean reward A -> B |", "|---|---|---|---|---|"]
    for r in summary["comparisons"]:
        seeds = ", ".join(f"{100 * x:.0f}%" for x in r["per_seed"])
        lines.append(f"| {r['b']} vs {r['a']} | {r['kind']} | {100 * r['rate']:.1f}% [{100 * r['low']:.1f}, "
                     f"{100 * r['high']:.1f}] | {seeds} | {r['mean_a']:.4f} -> {r['mean_b']:.4f} |")
    lines += ["", "Compute to quality (NCP-X's training FLOPs to reach X's final reward, as a fraction of X's "
              "budget; per seed):", ""]
    for r in summary["comparisons"]:
        if "time_to_quality_per_seed" in r:
            vals = ", ".join(v if isinstance(v, str) else ("never" if v is None else f"{v:.2f}")
                             for v in r["time_to_quality_per_seed"])
            lines.append(f"- {r['b']} vs {r['a']}: {vals}")
    lines += ["", "Mean reward per model (mean over seeds of each seed's mean):", "", "| model | mean | per seed |",
              "|---|---|---|"]
    for name, per_seed in summary["model_means"].items():
        lines.append(f"| {name} | {statistics.fmean(per_seed):.4f} | {', '.join(f'{x:.4f}' for x in per_seed)} |")
    lines += ["", f"![mean curves](toy_reproduction{backbone_suffix(backbone)}.png)", "",
              "The curves: the mean over seeds of each checkpoint's mean reward on the test curve prompts; bands: "
              "-/+ one standard deviation over seeds.", ""]
    return "\n".join(lines)


def seed_results_dir(backbone: str) -> Path:
    return RESULTS / f"toy_reproduction{backbone_suffix(backbone)}_seeds"


def backbone_suffix(backbone: str) -> str:
    """The results' file-name suffix: none for the U-Net (the reference world), ``_dit`` for the DiT."""
    return "" if backbone == "unet" else f"_{backbone}"


def seed_record(world: ToyWorld, setting: dict, code: str) -> dict:
    """What pooling needs from one seed's world, kept so the seed need not be retrained elsewhere; ``code``: the
    version that started the run."""
    return {"setting": setting, "code": code, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.processor() or platform.machine()}",
            "eval": json.loads((world.out / "eval" / "results.json").read_text()),
            "steps": json.loads((world.out / "budget.json").read_text())["steps"],
            "stage_seconds": {stage: rec["seconds"] for stage, rec in
                              json.loads((world.out / "stages.json").read_text()).items()},
            "filter": json.loads((world.out / "filtered" / "stats.json").read_text())["after"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=TrainStageConfig().budget_dpo_steps,
                        help="equal compute per run, in DPO steps (FLOPs)")
    parser.add_argument("--images", type=int, default=8, help="images per test caption")
    parser.add_argument("--backbone", choices=("unet", "dit"), default="unet", help="the base model's denoiser")
    parser.add_argument("--out", help="default: outputs/toy_reproduction (the DiT's: outputs/toy_reproduction_dit)")
    parser.add_argument("--rerun", action="store_true", help="retrain the seeds given, replacing their records")
    args = parser.parse_args()
    suffix = backbone_suffix(args.backbone)
    args.out = args.out or f"outputs/toy_reproduction{suffix}"
    setting = {"budget_dpo_steps": args.budget, "images_per_prompt": args.images, "backbone": args.backbone}
    start, code = time.perf_counter(), code_version()
    records = []
    for seed in args.seeds:
        path = seed_results_dir(args.backbone) / f"seed-{seed}.json"
        record = None if args.rerun else reuse(path, {"setting": setting},
                                               "pass --rerun to retrain this seed, or another --budget/--images")
        if record is not None:
            print(f"seed {seed}: reusing {path} (code {record['code']}, finished {record['finished']})")
        else:
            world = ToyWorld(Path(args.out) / f"seed-{seed}", world_config(seed, args.budget, args.images, args.backbone))
            world.run()
            record = seed_record(world, setting, code)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(record, indent=1))
        records.append(record)
    results = [r["eval"] for r in records]
    summary = {
        "command": "python benchmarks/toy_reproduction.py " + " ".join(
            [f"--seeds {' '.join(map(str, args.seeds))}", f"--budget {args.budget}", f"--images {args.images}"]
            + ([f"--backbone {args.backbone}"] if suffix else [])),
        "backbone": args.backbone,
        "seeds": args.seeds, "budget_dpo_steps": args.budget, "images_per_prompt": args.images,
        "test_prompts": results[0]["spec"]["prompts"],
        "steps": records[0]["steps"],
        "base_by_split": {split: {"mean": statistics.fmean(r["base_by_split"][split]["mean"] for r in results),
                                  **{k: statistics.fmean(r["base_by_split"][split]["components"][k] for r in results)
                                     for k in results[0]["base_by_split"][split]["components"]}}
                          for split in results[0]["base_by_split"]},
        "wall_minutes": (time.perf_counter() - start) / 60,
        "seed_sources": {str(s): {"code": r["code"], "finished": r["finished"], "machine": r["machine"]}
                         for s, r in zip(args.seeds, records)},
        "stage_seconds": {str(s): r["stage_seconds"] for s, r in zip(args.seeds, records)},
        "machine": f"{platform.processor() or platform.machine()}, torch threads as set by torch",
        "comparisons": pooled(results),
        "model_means": {name: [r["models"][name]["mean"] for r in results] for name in results[0]["models"]},
        "curves_mean": mean_curves(results),
        "filter": [r["filter"] for r in records],
    }
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"toy_reproduction{suffix}.json", json.dumps(summary, indent=1))
    atomic_write_text(RESULTS / f"toy_reproduction{suffix}.md", markdown(summary))
    from ncppo.plots import save_reward_curves

    base_curve = next(iter(summary["curves_mean"].values()))[0]["mean"]
    save_reward_curves(summary["curves_mean"], RESULTS / f"toy_reproduction{suffix}.png", "mean oracle reward (mean of seeds)",
                       base_curve, prompts=results[0]["spec"]["curve_prompts"], x_key="compute",
                       xlabel="training compute (DPO-step equivalents, FLOPs)",
                       title=f"test split, {len(args.seeds)} seeds, {args.backbone} base model", band_label="bands: -/+ 1 sd over seeds")
    print(markdown(summary))


if __name__ == "__main__":
    main()
