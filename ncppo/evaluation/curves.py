"""Reward against training time for real runs (the paper's Fig 4): ``ncppo curve``.

For each run folder (``ncppo train`` output), the base model (time 0) and every kept checkpoint generate
the prompt set with the same seeds (``ncppo generate``'s layout, resumable, under ``OUT/<run>/step-N``),
the reward scores them, and the mean goes on a curve against the checkpoint's training seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ncppo.evaluation.generation import GenerationSpec
from ncppo.evaluation.image_sets import generate_image_set
from ncppo.evaluation.prompts import PromptSet
from ncppo.evaluation.runs import apply_checkpoint, load_run_model, run_checkpoints
from ncppo.evaluation.scoring import read_scores, score_image_set
from ncppo.io import atomic_write_text


def _mean_score(folder: Path, reward, weights, pipe, prompts: PromptSet, spec: GenerationSpec, progress: bool) -> float:
    generate_image_set(pipe, prompts, folder, spec, progress=progress)
    score_image_set(folder, reward, weights, progress=progress)
    return float(np.mean(list(read_scores(folder)[reward.name].values())))


def run_curves(run_dirs: list[str | Path], prompts: PromptSet, spec: GenerationSpec, reward, out_dir: str | Path,
               weights: str | None = None, progress: bool = True) -> dict:
    """Curves for every run; writes ``OUT/curves.json`` and ``OUT/curves.png`` and returns the curves."""
    import yaml

    from ncppo.plots import save_reward_curves

    out = Path(out_dir)
    bases = {str(yaml.safe_load((Path(r) / "config.yaml").read_text())["model"]["pretrained"])
             for r in run_dirs if (Path(r) / "config.yaml").is_file()}
    if len(bases) > 1:  # the curves share one time-0 point: the base model
        raise ValueError(f"the runs start from different base models ({', '.join(sorted(bases))}); plot them separately")
    curves: dict[str, list[dict]] = {}
    base_mean = None
    for run in map(Path, run_dirs):
        checkpoints = run_checkpoints(run)
        if not checkpoints:
            raise FileNotFoundError(f"{run} has no checkpoints (train with checkpoint_every_steps/minutes set)")
        model = load_run_model(run)
        if base_mean is None:  # before any checkpoint is applied the model is the base (LoRA B = 0 at init)
            base_mean = _mean_score(out / "base", reward, weights, model.pipeline, prompts, spec, progress)
        points = [{"step": 0, "train_seconds": 0.0, "mean": base_mean}]
        for ckpt in checkpoints:
            apply_checkpoint(model, ckpt)
            mean = _mean_score(out / run.name / ckpt.path.name, reward, weights, model.pipeline, prompts, spec, progress)
            points.append({"step": ckpt.step, "train_seconds": ckpt.train_seconds, "mean": mean})
        curves[run.name] = points
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "curves.json", json.dumps({"reward": reward.name, "curves": curves}, indent=1))
    save_reward_curves(curves, out / "curves.png", f"mean {reward.name}", base_mean)
    return curves
