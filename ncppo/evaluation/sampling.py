"""Sampling real (or toy) models from files: a pipeline loaded for sampling (scheduler swap, dtype, LoRA,
device), and the library calls behind ``ncppo generate`` and ``ncppo curve``."""

from __future__ import annotations

from pathlib import Path

from ncppo.errors import UsageError
from ncppo.evaluation.generation import GenerationSpec

SCHEDULERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
              "euler-a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
              "unipc": "UniPCMultistepScheduler"}
DTYPES = ("fp32", "fp16", "bf16")


def load_sampling_pipeline(model: str | Path, lora: str | Path | None = None, scheduler: str | None = None,
                           dtype: str = "fp32", device: str | None = None):
    """A text-to-image pipeline ready to sample: ``model`` (a diffusers folder) in ``dtype``, its scheduler
    swapped for one of :data:`SCHEDULERS` (``None``: its own), a diffusers-format LoRA folder loaded, on
    ``device`` (default: CUDA when there is one)."""
    import diffusers
    import torch

    from ncppo.models.loading import ModelLoadError, load_pipeline

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {scheduler!r}; expected one of {', '.join(sorted(SCHEDULERS))}")
    if lora and not Path(lora).exists():
        raise FileNotFoundError(f"--lora {lora} does not exist")
    if lora:  # a run folder: its lora/; a folder without a LoRA: the folders in it that hold one
        from ncppo.models.lora_export import find_lora

        lora = find_lora(lora)
    pipe = load_pipeline(model, torch_dtype={"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
    if scheduler:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    if lora:
        try:
            pipe.load_lora_weights(str(lora))
        except (ValueError, OSError, KeyError, RuntimeError) as err:  # diffusers/peft on a folder that is no LoRA of it
            raise ModelLoadError(f"--lora {lora}: not a diffusers-format LoRA for {model} ({err})") from err
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def spec_for(prompts, **options) -> GenerationSpec:
    """The :class:`GenerationSpec` of a prompt set (``options``: its other fields; ``None`` keeps a default)."""
    return GenerationSpec(tuple(prompts.prompts), **{k: v for k, v in options.items() if v is not None})


def generate_from_files(model: str | Path, prompt_file: str | Path, out_dir: str | Path, *, lora: str | None = None,
                        scheduler: str | None = None, dtype: str = "fp32", limit: int | None = None,
                        overwrite: bool = False, progress: bool = True, **spec_options) -> dict:
    """``ncppo generate``: the prompts of ``prompt_file`` sampled by ``model`` (+ ``lora``) into ``out_dir``
    (:func:`ncppo.evaluation.image_sets.generate_image_set`, resumable); returns its counts."""
    from ncppo.evaluation.image_sets import generate_image_set
    from ncppo.evaluation.prompts import load_prompts

    prompts = load_prompts(prompt_file, limit=limit)
    spec = spec_for(prompts, **spec_options)
    pipe = load_sampling_pipeline(model, lora, scheduler, dtype)
    return generate_image_set(pipe, prompts, out_dir, spec, model=str(model), lora=str(lora or ""),
                              settings={"scheduler": scheduler or "default", "dtype": dtype}, overwrite=overwrite,
                              progress=progress)


def curves_from_files(run_dirs: list[str | Path], prompt_file: str | Path, reward: str, out_dir: str | Path, *,
                      weights: str | None = None, limit: int | None = None, progress: bool = True,
                      **spec_options) -> dict:
    """``ncppo curve``: reward ``reward`` against training time for every run's checkpoints
    (:func:`ncppo.evaluation.curves.run_curves`); returns the curves."""
    from ncppo.evaluation.curves import run_curves
    from ncppo.evaluation.prompts import load_prompts
    from ncppo.evaluation.rewards import make_reward

    prompts = load_prompts(prompt_file, limit=limit)
    return run_curves(run_dirs, prompts, spec_for(prompts, **spec_options), make_reward(reward, weights), out_dir,
                      weights, progress=progress)
