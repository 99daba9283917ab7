"""Validation images: the validation prompts sampled during training into ``validation/`` and the trackers,
and at the end of a LoRA run a base-vs-LoRA comparison grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def sample(model, prompts: list[str], steps: int, resolution: int) -> np.ndarray:
    """One image per prompt (seed = its index) as uint8 ``(N, H, W, 3)``."""
    from ncppo.models.loading import call_options

    images = model.pipeline(prompts, num_inference_steps=steps, height=resolution, width=resolution, output_type="np",
                            generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
                            **call_options(model.pipeline)).images
    return (images * 255).round().astype(np.uint8)


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
