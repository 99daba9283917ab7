"""Validation images: the validation prompts sampled during training into ``validation/`` and the trackers,
and at the end of a LoRA run a base-vs-LoRA comparison grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def sample(model, prompts: list[str], steps: int, resolution: int) -> np.ndarray:
    """One image per prompt (seed = its index) as uint8 ``(N, H, W, 3)``, at the pipeline's default guidance."""
    from ncppo.models.loading import render_images

    return render_images(model.pipeline, prompts, list(range(len(prompts))), steps, None, resolution, resolution)


@torch.no_grad()
def validate(model, config, out: Path, trackers, step: int, final: bool = False) -> None:
    """Sample ``config.validation_prompts`` into ``validation/step-N.png``, ``last.png`` and the trackers; at
    the end of a LoRA run also with the adapters off: ``validation/comparison.png`` (base and LoRA rows).
    Call it on the main process only."""
    prompts = config.validation_prompts
    if not prompts:
        return
    from ncppo.plots import save_image_grid
    from ncppo.training.logging import log_images

    args = (prompts, config.validation_steps, config.data.resolution)
    model.unet.eval()
    try:
        grid = sample(model, *args)
        base = None
        if final and model.lora is not None:
            with model.frozen_unet():  # the same U-Net with its adapters off: the base model
                base = sample(model, *args)
    finally:
        model.unet.train()
    folder = out / "validation"
    folder.mkdir(exist_ok=True)
    save_image_grid([grid], [f"step {step}"], folder / f"step-{step:06d}.png")
    save_image_grid([grid], [f"step {step}"], folder / "last.png")
    log_images(trackers, "validation", grid, prompts, step)
    if base is not None:
        save_image_grid([base, grid], ["base model", f"LoRA, step {step}"], folder / "comparison.png")
        log_images(trackers, "comparison/base", base, prompts, step)
        log_images(trackers, "comparison/lora", grid, prompts, step)
