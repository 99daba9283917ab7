"""Reward against training time for real runs (the paper's Fig 4): ``ncppo curve``.

For each run folder (``ncppo train`` output), the base model (time 0) and every kept checkpoint generate
the prompt set with the same seeds (``ncppo generate``'s layout, resumable, under ``OUT/<run>/step-N``),
the reward scores them, and the mean goes on a curve against the checkpoint's training seconds.
:func:`checkpoint_curve` is the loop over one run's checkpoints (the toy world's evaluation uses it too).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ncppo.errors import NcppoError, UsageError
from ncppo.evaluation.generation import GenerationSpec
from ncppo.evaluation.image_sets import generate_image_set
from ncppo.evaluation.prompts import PromptSet
from ncppo.evaluation.runs import (
    CheckpointInfo,
    apply_checkpoint,
    load_run_model,
    run_checkpoints,
    run_config,
)
from ncppo.evaluation.scoring import read_scores, score_image_set
from ncppo.io import atomic_write_text


class NoCheckpointsError(NcppoError, FileNotFoundError):
    """A run to put on a curve has no finished checkpoint."""


Score = float | dict  # a mean, or {"mean", and optionally "low", "high", "prompts"}


def _point(value: Score) -> dict:
    return {k: float(v) if k != "prompts" else int(v) for k, v in value.items()} if isinstance(value, dict) \
        else {"mean": float(value)}


def checkpoint_curve(run_dir: str | Path, score: Callable[[object, CheckpointInfo, bool], Score],
                     base: Score | Callable[[object], Score]) -> list[dict]:
    """One run's reward-vs-training-time points: ``{"step", "train_seconds", "mean"}``, time 0 first (plus
    ``low``, ``high``, ``prompts`` when the scores carry an interval).

    ``base`` is the base model's mean (or its dict), or ``base(pipe)`` computes it on the run's model before
    any checkpoint is applied (then the model is the base: LoRA B = 0 at init). Every checkpoint, oldest
    first, is applied to the model in turn and scored by ``score(pipe, checkpoint, is_last)``.
    """
    checkpoints = run_checkpoints(run_dir)
    if not checkpoints:
        raise NoCheckpointsError(f"{run_dir} has no checkpoints (train with checkpoint_every_steps/minutes set)")
    model = load_run_model(run_dir)
    points = [{"step": 0, "train_seconds": 0.0, **_point(base(model.pipeline) if callable(base) else base)}]
    for index, ckpt in enumerate(checkpoints):
        apply_checkpoint(model, ckpt)
        value = score(model.pipeline, ckpt, index == len(checkpoints) - 1)
        points.append({"step": ckpt.step, "train_seconds": ckpt.train_seconds, **_point(value)})
    return points


def _mean_score(folder: Path, reward, weights, pipe, prompts: PromptSet, spec: GenerationSpec, progress: bool) -> dict:
    """The set's mean reward with its 95% bootstrap interval over prompts."""
    from ncppo.evaluation.image_sets import read_manifest
    from ncppo.evaluation.stats import mean_interval

    generate_image_set(pipe, prompts, folder, spec, progress=progress)
    score_image_set(folder, reward, weights, progress=progress)
    scores = read_scores(folder)[reward.name]
    records = read_manifest(folder)
    return mean_interval([scores[r.id] for r in records], [r.prompt_index for r in records]).to_dict()


def run_curves(run_dirs: list[str | Path], prompts: PromptSet, spec: GenerationSpec, reward, out_dir: str | Path,
               weights: str | None = None, progress: bool = True, overwrite: bool = False) -> dict:
    """Curves for every run; writes ``OUT/curves.json`` and ``OUT/curves.png`` and returns the curves. ``OUT``
    holds each checkpoint's image set, so a rerun resumes there; a folder that ``ncppo curve`` did not write,
    or one inside a run, is refused (``overwrite``: removed first)."""
    from ncppo.io import open_output_dir
    from ncppo.plots import save_reward_curves

    out = open_output_dir(out_dir, "curve", inputs=list(run_dirs), overwrite=overwrite)
    bases = {run_config(r).model.pretrained for r in run_dirs if (Path(r) / "config.yaml").is_file()}
    if len(bases) > 1:  # the curves share one time-0 point: the base model
        raise UsageError(f"the runs start from different base models ({', '.join(sorted(bases))}); plot them separately")
    curves: dict[str, list[dict]] = {}
    base_mean: dict | None = None
    for run in map(Path, run_dirs):
        def score(pipe, ckpt, _last, run=run):
            return _mean_score(out / run.name / ckpt.path.name, reward, weights, pipe, prompts, spec, progress)

        def base(pipe):
            return _mean_score(out / "base", reward, weights, pipe, prompts, spec, progress)

        curves[run.name] = checkpoint_curve(run, score, base if base_mean is None else base_mean)
        base_mean = {k: v for k, v in curves[run.name][0].items() if k not in ("step", "train_seconds")}
    out.mkdir(parents=True, exist_ok=True)
    record = {"reward": reward.name, "prompts": len(prompts), "prompt_source": prompts.source,
              "spec": {k: v for k, v in asdict(spec).items() if k not in ("prompts", "batch_size")}, "curves": curves}
    atomic_write_text(out / "curves.json", json.dumps(record, indent=1))
    save_reward_curves(curves, out / "curves.png", f"mean {reward.name}", base_mean["mean"], prompts=len(prompts),
                       title=f"{reward.name} against training time")
    return curves
