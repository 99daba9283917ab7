"""Evaluating the toy world's runs: paired samples on the held-out captions of one split (``eval.split``,
normally ``test``), the oracle reward, win rates with bootstrap intervals, reward-vs-compute curves and
compute to quality; the base model also on the other held-out split. Writes ``eval/results.json``
(every number the report states) and ``eval/images/*.npz`` (the samples, for the report's grids)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ncppo.errors import StateError
from ncppo.evaluation import GenerationSpec, generate_samples, make_reward, paired_win_rate
from ncppo.evaluation.curves import checkpoint_curve
from ncppo.io import atomic_directory, atomic_file, atomic_write_text
from ncppo.toy.config import EvalConfig, ToyConfig
from ncppo.toy.layout import ToyLayout, slug
from ncppo.toy.oracle import score_components


def eval_specs(cfg: EvalConfig, split: str | None = None) -> tuple[GenerationSpec, GenerationSpec]:
    """The final evaluation (the captions of ``split``, default ``cfg.split``) and the curve subset (every
    ``stride``-th, same seeds). A caption's id is its index among the world's captions, so its seeds do not
    depend on the split it is evaluated in."""
    from ncppo.toy.splits import split_captions
    from ncppo.toy.world import all_scenes

    every = [s.caption for s in all_scenes()]
    captions = split_captions(split or cfg.split)
    full = GenerationSpec(tuple(captions), cfg.images_per_prompt, cfg.seed, cfg.num_inference_steps,
                          cfg.guidance_scale, cfg.batch_size, prompt_ids=tuple(every.index(c) for c in captions))
    if cfg.prompts is not None and cfg.prompts < len(captions):
        full = full.subset(np.linspace(0, len(captions) - 1, cfg.prompts).round().astype(int))
    return full, full.subset(range(0, len(full.prompts), cfg.curve_prompt_stride))


def _save_images(path: Path, samples) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:  # a file object: savez would append ".npz" to a path
        np.savez_compressed(f, images=samples.images, prompt_ids=samples.prompt_ids, seeds=samples.seeds)


def _model_record(samples, rewards: np.ndarray) -> dict:
    parts = [score_components(i, p) for i, p in zip(samples.images, samples.prompts)]
    return {"mean": float(rewards.mean()), "median": float(np.median(rewards)), "rewards": rewards.tolist(),
            "prompt_ids": samples.prompt_ids.tolist(), "seeds": samples.seeds.tolist(),
            "components": {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}}


def _summary(record: dict) -> dict:
    return {"mean": record["mean"], "images": len(record["rewards"]), "components": record["components"]}


def time_to_reach(curve: list[dict], target: float, axis: str = "compute") -> float | None:
    """The first ``axis`` value (``compute`` in DPO-step equivalents, or ``train_seconds``) at which ``curve``
    (points with ``axis`` and ``mean``) reaches ``target``, linearly interpolated between checkpoints; None
    when it never does."""
    for before, after in zip(curve, curve[1:]):
        if after["mean"] >= target:
            if before["mean"] >= target:
                return before[axis]
            frac = (target - before["mean"]) / (after["mean"] - before["mean"])
            return before[axis] + frac * (after[axis] - before[axis])
    return None


def evaluate_world(layout: ToyLayout, config: ToyConfig, progress: bool = True) -> dict:
    """Sample, score and compare the base model and every run of ``config`` in ``layout``; writes ``eval/``
    (``results.json`` and the samples) in one piece and returns the results."""
    from ncppo.models.loading import load_pipeline

    full, curve_spec = eval_specs(config.eval)
    other_split = "validation" if config.eval.split == "test" else "test"
    curve_ids = set(curve_spec.prompt_ids)
    budget = json.loads(layout.budget.read_text())
    flops = budget["flops_per_step"]
    reward = make_reward("oracle")

    def score(pipe, spec, desc):
        samples = generate_samples(pipe, spec, progress=progress, desc=desc)
        return samples, reward(samples.images, samples.prompts)

    def curve_mean(rewards, prompt_ids):
        return float(np.mean([r for r, p in zip(rewards, prompt_ids) if p in curve_ids]))

    models, curves, samples_of = {}, {}, {}
    partial = _Partial(layout, config.fingerprint("pretrain", "pairs", "filter", "train", "eval"))
    if (cached := partial.load("base")) is not None:
        models["base"], base_splits, samples_of["base"] = cached
    else:
        base_pipe = load_pipeline(layout.base_model)
        samples, rewards = score(base_pipe, full, "eval base")
        models["base"], samples_of["base"] = _model_record(samples, rewards), samples
        other = score(base_pipe, eval_specs(config.eval, other_split)[0], f"eval base ({other_split})")
        base_splits = {config.eval.split: _summary(models["base"]), other_split: _summary(_model_record(*other))}
        partial.save("base", models["base"], base_splits, samples_of["base"])
        del base_pipe
    base_mean = curve_mean(models["base"]["rewards"], models["base"]["prompt_ids"])
    for name in config.train.run_names():
        if (cached := partial.load(name)) is not None:  # evaluated before an interruption
            models[name], curves[name], samples_of[name] = cached
            continue

        def score_checkpoint(pipe, ckpt, last, name=name):
            if not last:  # intermediate checkpoints: the curve prompts only
                return float(score(pipe, curve_spec, f"eval {name} step {ckpt.step}")[1].mean())
            s, r = score(pipe, full, f"eval {name}")  # the last: every prompt, for the win rates
            models[name], samples_of[name] = _model_record(s, r), s
            return curve_mean(r, s.prompt_ids)

        ratio = flops[name.rsplit("/", 1)[1]] / flops[budget["reference"]]
        curves[name] = [{**p, "compute": p["step"] * ratio}
                        for p in checkpoint_curve(layout.run_dir(name), score_checkpoint, base_mean)]
        partial.save(name, models[name], curves[name], samples_of[name])
    results = {"spec": {"split": config.eval.split, "prompts": len(full.prompts),
                        "images_per_prompt": full.images_per_prompt, "seed": full.seed,
                        "num_inference_steps": full.num_inference_steps, "guidance_scale": full.guidance_scale,
                        "curve_prompts": len(curve_spec.prompts)},
               "base_by_split": base_splits, "models": models, "curves": curves}
    results["comparisons"] = compare_models(models, curves, config.eval.bootstrap)
    with atomic_directory(layout.eval_dir) as tmp:  # results and samples appear together
        for name, samples in samples_of.items():
            _save_images(layout.eval_images(name, tmp), samples)
        (tmp / layout.results.name).write_text(json.dumps(results, indent=1))
    shutil.rmtree(layout.eval_partial, ignore_errors=True)
    return results


class _Partial:
    """Each model's evaluation (record, curve or base splits, samples) kept as soon as it is done, so an
    interrupted ``evaluate`` stage resumes model by model; a record made from other config sections is ignored."""

    def __init__(self, layout: ToyLayout, fingerprint: str):
        self.folder, self.fingerprint = layout.eval_partial, fingerprint

    def _paths(self, name: str) -> tuple[Path, Path]:
        stem = self.folder / slug(name)
        return stem.with_suffix(".json"), stem.with_suffix(".npz")

    def load(self, name: str):
        record_path, images_path = self._paths(name)
        if not (record_path.is_file() and images_path.is_file()):
            return None
        record = json.loads(record_path.read_text())
        if record.get("fingerprint") != self.fingerprint:
            return None
        with np.load(images_path) as data:
            samples = SimpleNamespace(images=data["images"], prompt_ids=data["prompt_ids"], seeds=data["seeds"])
        return record["model"], record["extra"], samples

    def save(self, name: str, model: dict, extra, samples) -> None:
        record_path, images_path = self._paths(name)
        _save_images(images_path, samples)  # the images first: a record is never without them
        atomic_write_text(record_path, json.dumps({"fingerprint": self.fingerprint, "model": model, "extra": extra}))


def compare_models(models: dict, curves: dict, n_boot: int) -> list[dict]:
    """Win rates (B over A): every run vs base, NCP-X vs X per dataset, filtered vs original per method;
    for NCP-X vs X also the compute NCP-X needed to reach X's final reward, as a fraction of X's budget."""
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
            raise StateError(f"{a} and {b} were not sampled with the same seeds; their comparison would not be paired")
        win = paired_win_rate(ra["rewards"], rb["rewards"], groups=ra["prompt_ids"], n_boot=n_boot)
        row = {"a": a, "b": b, "kind": kind, **win.to_dict(), "mean_a": ra["mean"], "mean_b": rb["mean"]}
        if kind == "NCP vs noise space":
            target, budget = curves[a][-1]["mean"], curves[a][-1]["compute"]
            if target <= curves[a][0]["mean"]:
                row["time_to_quality"] = "baseline did not improve on the base model"
            else:
                reached = time_to_reach(curves[b], target)
                row["time_to_quality"] = None if reached is None else reached / budget
        out.append(row)
    return out
