"""Trained runs as models to evaluate: the run's base pipeline with the weights of any of its checkpoints.

A run folder (written by ``ncppo.training.Trainer``) holds ``config.yaml`` (its settings, which
:func:`ncppo.training.config.load_config` reloads, with absolute paths) and ``checkpoints/step-*/`` (trainable tensors plus ``state.json`` with the training seconds
so far), which is what reward-vs-training-time curves need. The checkpoint files are read through
:mod:`ncppo.training.checkpoint`, which writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class CheckpointInfo:
    """A finished checkpoint of a run: its folder, optimiser step and the training seconds it was taken at."""

    path: Path
    step: int
    train_seconds: float


def run_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """The run's finished checkpoints, oldest first, with the training time each was taken at."""
    from ncppo.training.checkpoint import checkpoint_dirs, read_state

    found = []
    for path in checkpoint_dirs(run_dir):
        state = read_state(path)
        found.append(CheckpointInfo(path, int(state["step"]), float(state["train_seconds"])))
    return found


def run_config(run_dir: str | Path):
    """The run's :class:`~ncppo.training.config.TrainConfig`, reloaded from its ``config.yaml`` (a folder
    without one is not a training run)."""
    from ncppo.training.config import load_run_config

    return load_run_config(run_dir)


def load_run_model(run_dir: str | Path):
    """A ``PreferenceModel`` with the run's base pipeline and (untrained) adapters, built as the trainer
    builds it; see ``apply_checkpoint``."""
    from ncppo.training.setup import build_model

    model = build_model(run_config(run_dir).model)
    model.unet.eval()
    return model


@torch.no_grad()
def apply_checkpoint(model, checkpoint: str | Path | CheckpointInfo) -> None:
    """Load a checkpoint's trained tensors into ``model`` in place; they must be the model's trained
    parameters, by name and shape (:func:`ncppo.training.checkpoint.restore_trainable`)."""
    from ncppo.training.checkpoint import restore_trainable

    path = checkpoint.path if isinstance(checkpoint, CheckpointInfo) else Path(checkpoint)
    restore_trainable(path, model, " (was it written by another run?)", command="evaluate")
