"""Training one toy-world method through the project's real trainer, on an equal time budget."""

from __future__ import annotations

import shutil
from pathlib import Path

from ncppo.toy.config import TrainStageConfig


def train_values(cfg: TrainStageConfig, method: str, data: Path, base_model: Path, run_dir: Path,
                 resolution: int) -> dict:
    """The ``TrainConfig`` values of one run: the same budget, data and optimiser for every method."""
    beta = cfg.beta_perceptual if method.startswith("ncp-") else cfg.beta_noise
    return {
        "output_dir": str(run_dir), "seed": cfg.seed, "batch_size": cfg.batch_size, "max_steps": cfg.max_steps,
        "max_train_minutes": cfg.minutes_per_run,
        "checkpoint_every_minutes": cfg.minutes_per_run / max(cfg.checkpoints_per_run, 1),
        "keep_last_checkpoints": cfg.checkpoints_per_run + 2,  # every curve point survives
        "resume": False, "log_every": 1, "report_to": ["jsonl"],
        "model": {"pretrained": str(base_model), "lora_rank": cfg.lora_rank},
        "data": {"source": str(data), "resolution": resolution, "tie_policy": "drop"},
        "objective": {"name": method, **({"beta": beta} if not method.endswith("sft") else {}),
                      **({"scale": cfg.perceptual_scale} if method.startswith("ncp-") else {})},
        "optim": {"learning_rate": cfg.learning_rate, "scale_lr": False, "lr_scheduler": "constant"},
    }


def train_method(cfg: TrainStageConfig, method: str, data: Path, base_model: Path, run_dir: Path, resolution: int):
    """Train ``method`` from scratch into ``run_dir`` (a stale run there is removed first)."""
    from ncppo.training import Trainer, load_config

    shutil.rmtree(run_dir, ignore_errors=True)
    config = load_config(None, **train_values(cfg, method, data, base_model, run_dir, resolution))
    return Trainer(config).train()
