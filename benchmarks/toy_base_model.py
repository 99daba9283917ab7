"""The toy world's base model on its held-out splits: mean oracle reward and its components.

Samples the validation and test captions (``ncppo.toy.splits``) with the default sampler of the toy
world's evaluation (``EvalConfig``: DDIM steps, guidance, seed), ``--images`` per caption, and also at the
pair generator's second guidance scale, so the spread the preference data draws from is visible; for
reference, the oracle's score of ground-truth renders of the same captions.

    python benchmarks/toy_base_model.py                 # 4 images per caption: about 3 CPU-minutes
    python benchmarks/toy_base_model.py --images 1      # a quick look
    python benchmarks/toy_base_model.py --backbone dit  # the DiT base model (pretrain.backbone: dit)

Writes benchmarks/results/toy_base_model.json and .md (the DiT's: toy_base_model_dit.*).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncppo.io import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def score(pipe, spec) -> dict:
    from ncppo.evaluation import generate_samples
    from ncppo.toy.oracle import OracleReward, score_components

    samples = generate_samples(pipe, spec, progress=False)
    rewards = OracleReward()(samples.images, samples.prompts)
    parts = [score_components(i, p) for i, p in zip(samples.images, samples.prompts)]
    per_prompt = [float(np.mean(rewards[samples.prompt_ids == pid])) for pid in np.unique(samples.prompt_ids)]
    return {"mean": float(rewards.mean()), "images": len(rewards),
            "prompt_sd": statistics.stdev(per_prompt) if len(per_prompt) > 1 else 0.0,
            "components": {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}}


def main() -> None:
    from ncppo.evaluation import GenerationSpec
    from ncppo.models.loading import load_pipeline
    from ncppo.toy.config import ToyConfig
    from ncppo.toy.oracle import OracleReward
    from ncppo.toy.pretrain import base_model
    from ncppo.toy.splits import split_captions
    from ncppo.toy.world import Scene, all_scenes, render

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="images per caption")
    parser.add_argument("--backbone", choices=("unet", "dit"), default="unet", help="the base model's denoiser")
    args = parser.parse_args()
    config = ToyConfig()
    config = dataclasses.replace(config, pretrain=dataclasses.replace(config.pretrain, backbone=args.backbone))
    suffix = "" if args.backbone == "unet" else f"_{args.backbone}"
    path = base_model(config.pretrain)
    record = json.loads((path / "pretrain.json").read_text())
    pipe = load_pipeline(path)
    every = [s.caption for s in all_scenes()]
    e = config.eval
    start = time.perf_counter()
    out = {"command": "python benchmarks/toy_base_model.py --images " + str(args.images)
           + (f" --backbone {args.backbone}" if suffix else ""), "model": str(path.name), "backbone": args.backbone,
           "fingerprint": record["fingerprint"], "recipe": record["config"], "pretrain_seconds": record["seconds"],
           "sampler": {"num_inference_steps": e.num_inference_steps, "guidance_scale": e.guidance_scale,
                       "seed": e.seed}, "splits": {}}
    for split in ("validation", "test"):
        captions = split_captions(split)
        spec = GenerationSpec(tuple(captions), args.images, e.seed, e.num_inference_steps, e.guidance_scale,
                              e.batch_size, prompt_ids=tuple(every.index(c) for c in captions))
        low_guidance = dataclasses.replace(spec, guidance_scale=min(config.pairs.guidance_scales))
        rng = np.random.default_rng(0)
        truth = np.stack([render(Scene.parse(c), config.pretrain.image_size, rng) for c in captions])
        out["splits"][split] = {
            "default_sampler": score(pipe, spec),
            f"guidance_{low_guidance.guidance_scale:g}": score(pipe, low_guidance),
            "ground_truth_renders": float(OracleReward()(truth, captions).mean())}
    out["seconds"] = time.perf_counter() - start
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"toy_base_model{suffix}.json", json.dumps(out, indent=1))
    atomic_write_text(RESULTS / f"toy_base_model{suffix}.md", markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    r = out["recipe"]
    lines = ["# The toy world's base model on its held-out splits", "",
             f"Command: `{out['command']}`. Model `{out['model']}`: {r['steps']} steps of batch {r['batch_size']}, "
             f"lr {r['learning_rate']:g}, EMA {r['ema_decay']:g}, pretrained in {out['pretrain_seconds'] / 60:.0f} min. "
             f"Sampler: {out['sampler']['num_inference_steps']} DDIM steps, evaluation seed {out['sampler']['seed']}.",
             "", "| split | sampling | images | mean reward | sd over captions | object colour | background | shape | "
             "quality |", "|---|---|---|---|---|---|---|---|---|"]
    for split, rows in out["splits"].items():
        for name, row in rows.items():
            if name == "ground_truth_renders":
                continue
            label = f"guidance {out['sampler']['guidance_scale']:g}" if name == "default_sampler" else name.replace("_", " ")
            c = row["components"]
            lines.append(f"| {split} | {label} | {row['images']} | {row['mean']:.4f} | {row['prompt_sd']:.3f} | "
                         f"{c['object_colour']:.3f} | {c['background']:.3f} | {c['shape']:.3f} | {c['quality']:.3f} |")
    lines += ["", "Ground-truth renders of the same captions score " + ", ".join(
        f"{rows['ground_truth_renders']:.3f} ({split})" for split, rows in out["splits"].items()) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
