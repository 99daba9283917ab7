"""Training one toy-world method through the project's real trainer, on an equal compute budget."""

from __future__ import annotations

import shutil
from pathlib import Path

from ncppo.toy.config import TrainStageConfig


def objective_values(cfg: TrainStageConfig, method: str) -> dict:
    """The ``objective`` section of one run (the same beta convention for every method of a space)."""
    beta = cfg.beta_perceptual if method.startswith("ncp-") else cfg.beta_noise
    return {"name": method, **({"beta": beta} if not method.endswith("sft") else {}),
            **({"scale": cfg.perceptual_scale} if method.startswith("ncp-") else {})}


def train_values(cfg: TrainStageConfig, method: str, data: Path, base_model: Path, run_dir: Path,
                 resolution: int, steps: int) -> dict:
    """The ``TrainConfig`` values of one run of ``steps`` steps: the same data and optimiser for every method
    (``steps`` comes from the equal-compute budget, :func:`ncppo.toy.budget.equal_compute_steps`)."""
    return {
        "output_dir": str(run_dir), "seed": cfg.seed, "batch_size": cfg.batch_size, "max_steps": steps,
        "max_train_minutes": None, "checkpoint_every_minutes": None,
        "checkpoint_every_steps": max(1, steps // max(cfg.checkpoints_per_run, 1)),
        "keep_last_checkpoints": cfg.checkpoints_per_run + 2,  # every curve point survives
        "resume": False, "log_every": 1, "report_to": ["jsonl"],
        "model": {"pretrained": str(base_model), "lora_rank": cfg.lora_rank},
        "data": {"source": str(data), "resolution": resolution, "tie_policy": "drop"},
        "objective": objective_values(cfg, method),
        "optim": {"learning_rate": cfg.learning_rate, "scale_lr": False, "lr_scheduler": "constant"},
    }


def train_method(cfg: TrainStageConfig, method: str, data: Path, base_model: Path, run_dir: Path, resolution: int,
                 steps: int):
    """Train ``method`` for ``steps`` steps from scratch into ``run_dir`` (a stale run there is removed first)."""
    from ncppo.training import Trainer, load_config

    shutil.rmtree(run_dir, ignore_errors=True)
    config = load_config(None, **train_values(cfg, method, data, base_model, run_dir, resolution, steps))
    return Trainer(config).train()
