"""Evaluating the toy world's runs: paired samples on every caption, the oracle reward, win rates with
bootstrap intervals, reward-vs-training-time curves and time to quality. Writes ``eval/results.json``
(every number the report states) and ``eval/images/*.npz`` (the samples, for the report's grids)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ncppo.evaluation import GenerationSpec, generate_samples, make_reward, paired_win_rate
from ncppo.evaluation.runs import apply_checkpoint, load_run_model, run_checkpoints
from ncppo.io import atomic_write_text
from ncppo.toy.oracle import score_components
from ncppo.toy.stages import slug


def eval_specs(world) -> tuple[GenerationSpec, GenerationSpec]:
    """The final evaluation (every caption) and the curve subset (every ``stride``-th, same seeds)."""
    from ncppo.toy.world import all_scenes

    cfg = world.config.eval
    captions = [s.caption for s in all_scenes()]
    full = GenerationSpec(tuple(captions), cfg.images_per_prompt, cfg.seed, cfg.num_inference_steps,
                          cfg.guidance_scale, cfg.batch_size)
    if cfg.prompts is not None and cfg.prompts < len(captions):
        full = full.subset(np.linspace(0, len(captions) - 1, cfg.prompts).round().astype(int))
    return full, full.subset(range(0, len(full.prompts), cfg.curve_prompt_stride))


def _save_images(path: Path, samples) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, images=samples.images, prompt_ids=samples.prompt_ids, seeds=samples.seeds)
    tmp.replace(path)


def _model_record(samples, rewards: np.ndarray) -> dict:
    parts = [score_components(i, p) for i, p in zip(samples.images, samples.prompts)]
    return {"mean": float(rewards.mean()), "median": float(np.median(rewards)), "rewards": rewards.tolist(),
            "prompt_ids": samples.prompt_ids.tolist(), "seeds": samples.seeds.tolist(),
            "components": {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}}


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """The first training time at which ``curve`` (points with ``train_seconds`` and ``mean``) reaches
    ``target``, linearly interpolated between checkpoints; None when it never does."""
    for before, after in zip(curve, curve[1:]):
        if after["mean"] >= target:
            if before["mean"] >= target:
                return before["train_seconds"]
            frac = (target - before["mean"]) / (after["mean"] - before["mean"])
            return before["train_seconds"] + frac * (after["train_seconds"] - before["train_seconds"])
    return None


def evaluate_world(world) -> dict:
    cfg = world.config.eval
    full, curve_spec = eval_specs(world)
    curve_ids = set(curve_spec.prompt_ids)
    reward = make_reward("oracle")
    progress = world.progress
    from ncppo.models.loading import load_pipeline

    def score(pipe, spec, desc):
        samples = generate_samples(pipe, spec, progress=progress, desc=desc)
        return samples, reward(samples.images, samples.prompts)

    def curve_mean(samples, rewards):
        return float(np.mean([r for r, p in zip(rewards, samples.prompt_ids) if p in curve_ids]))

    models, curves = {}, {}
    samples, rewards = score(load_pipeline(world.base_model_path()), full, "eval base")
    models["base"] = _model_record(samples, rewards)
    _save_images(world.out / "eval" / "images" / "base.npz", samples)
    base_point = {"step": 0, "train_seconds": 0.0, "mean": curve_mean(samples, rewards)}
    for name in world.config.train.run_names():
        run = world.run_dir(name)
        model, checkpoints = load_run_model(run), run_checkpoints(run)
        if not checkpoints:
            raise FileNotFoundError(f"{run}: the run has no checkpoint to evaluate")
        points = [base_point]
        for ckpt in checkpoints[:-1]:
            apply_checkpoint(model, ckpt)
            s, r = score(model.pipeline, curve_spec, f"eval {name} step {ckpt.step}")
            points.append({"step": ckpt.step, "train_seconds": ckpt.train_seconds, "mean": float(r.mean())})
        last = checkpoints[-1]
        apply_checkpoint(model, last)
        s, r = score(model.pipeline, full, f"eval {name}")
        points.append({"step": last.step, "train_seconds": last.train_seconds, "mean": curve_mean(s, r)})
        models[name], curves[name] = _model_record(s, r), points
        _save_images(world.out / "eval" / "images" / f"{slug(name)}.npz", s)
    results = {"spec": {"prompts": len(full.prompts), "images_per_prompt": full.images_per_prompt, "seed": full.seed,
                        "num_inference_steps": full.num_inference_steps, "guidance_scale": full.guidance_scale,
                        "curve_prompts": len(curve_spec.prompts)},
               "models": models, "curves": curves}
    results["comparisons"] = compare_models(models, curves, cfg.bootstrap)
    atomic_write_text(world.out / "eval" / "results.json", json.dumps(results, indent=1))
    return results


def compare_models(models: dict, curves: dict, n_boot: int) -> list[dict]:
    """Win rates (B over A): every run vs base, NCP-X vs X per dataset, filtered vs original per method;
    for NCP-X vs X also the time NCP-X needed to reach X's final reward, as a fraction of X's budget."""
    pairs = [("base", name, "vs base") for name in models if name != "base"]
    for name in models:
        dataset, _, method = name.rpartition("/")
        if method.startswith("ncp-") and f"{dataset}/{method[4:]}" in models:
            pairs.append((f"{dataset}/{method[4:]}", name, "NCP vs noise space"))
    for name in models:
        dataset, _, method = name.rpartition("/")
        if dataset == "filtered" and f"original/{method}" in models:
            pairs.append((f"original/{method}", name, "filtered vs original"))
        if dataset in ("x>y,x>z", "x>y,y>z") and f"filtered/{method}" in models:
            pairs.append((f"filtered/{method}", name, "Table 2 variant vs x>y (= filtered)"))
    out = []
    for a, b, kind in pairs:
        ra, rb = models[a], models[b]
        if ra["seeds"] != rb["seeds"]:
            raise ValueError(f"{a} and {b} were not sampled with the same seeds; their comparison would not be paired")
        win = paired_win_rate(ra["rewards"], rb["rewards"], groups=ra["prompt_ids"], n_boot=n_boot)
        row = {"a": a, "b": b, "kind": kind, **win.to_dict(), "mean_a": ra["mean"], "mean_b": rb["mean"]}
        if kind == "NCP vs noise space":
            target, budget = curves[a][-1]["mean"], curves[a][-1]["train_seconds"]
            if target <= curves[a][0]["mean"]:
                row["time_to_quality"] = "baseline did not improve on the base model"
            else:
                reached = time_to_reach(curves[b], target)
                row["time_to_quality"] = None if reached is None else reached / budget
        out.append(row)
    return out
