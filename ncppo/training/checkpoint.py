"""Training checkpoints: trainable weights, optimizer, LR scheduler and counters, written atomically.

``checkpoints/step-000120/`` holds ``trainable.safetensors`` (LoRA or the full U-Net's trainable
tensors, not the frozen base), ``optimizer.pt``, ``scheduler.pt`` and ``state.json`` (step, micro-step,
training seconds). It is written in a scratch folder and renamed, so a kill during a save leaves the
previous checkpoint whole; the newest ``keep_last`` are kept. Randomness needs no saved state: every
micro-step's noise, prompt dropout and data order derive from (seed, step), so resuming replays them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ncppo.io import atomic_directory

PREFIX = "step-"


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first (scratch folders start with a dot and are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(output_dir, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    state: dict, keep_last: int) -> Path:
    from safetensors.torch import save_file

    target = Path(output_dir) / "checkpoints" / f"{PREFIX}{step:06d}"
    with atomic_directory(target) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    for old in checkpoint_dirs(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, optimizer, scheduler) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore optimizer and scheduler in place; return the trainable tensors and the counters."""
    from safetensors.torch import load_file

    trainable = load_file(str(path / "trainable.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    return trainable, json.loads((path / "state.json").read_text())
