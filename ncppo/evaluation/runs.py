"""Trained runs as models to evaluate: the run's base pipeline with the weights of any of its checkpoints.

A run folder (written by ``ncppo.training.Trainer``) holds ``config.yaml`` (the base model and LoRA
settings) and ``checkpoints/step-*/`` (trainable tensors plus ``state.json`` with the training seconds
so far), which is what reward-vs-training-time curves need. The checkpoint files are read through
:mod:`ncppo.training.checkpoint`, which writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ncppo.errors import StateError


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


def run_config(run_dir: str | Path) -> dict:
    """The run's resolved ``config.yaml`` as a mapping (a folder without one is not a training run)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run (no config.yaml)")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise StateError(f"{path} cannot be read ({err})") from err


def load_run_model(run_dir: str | Path):
    """A ``PreferenceModel`` with the run's base pipeline and (untrained) adapters; see ``apply_checkpoint``."""
    from ncppo.models.preference_model import LoraSettings, PreferenceModel

    model_cfg = run_config(run_dir)["model"]
    lora = LoraSettings(model_cfg["lora_rank"], model_cfg.get("lora_alpha"), tuple(model_cfg["lora_targets"]))
    model = PreferenceModel.from_pretrained(model_cfg["pretrained"], finetune=model_cfg["finetune"], lora=lora)
    model.unet.eval()
    return model


@torch.no_grad()
def apply_checkpoint(model, checkpoint: str | Path | CheckpointInfo) -> None:
    """Load a checkpoint's trainable tensors into ``model`` in place; every tensor must find its parameter."""
    from ncppo.training.checkpoint import load_trainable

    path = checkpoint.path if isinstance(checkpoint, CheckpointInfo) else Path(checkpoint)
    missing = model.unet.load_state_dict(load_trainable(path), strict=False).unexpected_keys
    if missing:
        raise StateError(f"{path}: {len(missing)} tensors match no parameter of the model (first: {missing[0]}); "
                         "was it written by another run?")
