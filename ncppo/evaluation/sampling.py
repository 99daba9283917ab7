"""Sampling real (or toy) models from files: a pipeline loaded for sampling (scheduler swap, dtype, LoRA,
device), and the library calls behind ``ncppo generate`` and ``ncppo curve``."""

from __future__ import annotations

from pathlib import Path

from ncppo.errors import UsageError
from ncppo.evaluation.generation import GenerationSpec
from ncppo.models.loading import call_options

SCHEDULERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
              "euler-a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
              "unipc": "UniPCMultistepScheduler"}
DTYPES = ("fp32", "fp16", "bf16")


def load_sampling_pipeline(model: str | Path, lora: str | Path | None = None, scheduler: str | None = None,
                           dtype: str = "fp32", device: str | None = None):
    """A text-to-image pipeline ready to sample: ``model`` (a diffusers folder) in ``dtype``, its scheduler
    swapped for one of :data:`SCHEDULERS` (``None``: its own), a diffusers-format LoRA folder loaded (PixArt-Sigma,
    which diffusers has no LoRA loader for: the peft LoRA ncppo writes, by ``load_peft_lora``), on ``device``
    (default: CUDA when there is one). Every call for images goes through
    :func:`~ncppo.evaluation.generation.render_images`, which adds the pipeline's call options."""
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
        if "FlowMatch" in type(pipe.scheduler).__name__:  # the DDPM-family samplers would give wrong images
            raise UsageError(f"--scheduler {scheduler}: {model} is a flow-matching model ({type(pipe.scheduler).__name__}); "
                             "the --scheduler choices are DDPM-family samplers (leave --scheduler out)")
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    if lora:
        _check_lora_fits(pipe, Path(lora), model)
        try:
            if hasattr(pipe, "load_lora_weights"):
                pipe.load_lora_weights(str(lora))
            else:  # PixArt-Sigma
                from ncppo.models.transformers_backbone import load_peft_lora

                load_peft_lora(pipe, lora)
        except (ValueError, OSError, KeyError, RuntimeError) as err:  # diffusers/peft on a folder that is no LoRA of it
            raise ModelLoadError(f"--lora {lora}: not a diffusers-format LoRA for {model} ({_first_lines(err)})") from err
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
    settings = {"scheduler": scheduler or "default", "dtype": dtype}
    options = call_options(pipe)
    if options:  # recorded: two sets compare only when made alike
        settings["call_options"] = options
    return generate_image_set(pipe, prompts, out_dir, spec, model=str(model), lora=str(lora or ""),
                              settings=settings, overwrite=overwrite, progress=progress)


def curves_from_files(run_dirs: list[str | Path], prompt_file: str | Path, reward: str, out_dir: str | Path, *,
                      weights: str | None = None, limit: int | None = None, progress: bool = True,
                      overwrite: bool = False, **spec_options) -> dict:
    """``ncppo curve``: reward ``reward`` against training time for every run's checkpoints
    (:func:`ncppo.evaluation.curves.run_curves`); returns the curves."""
    from ncppo.evaluation.curves import run_curves
    from ncppo.evaluation.prompts import load_prompts
    from ncppo.evaluation.rewards import make_reward

    prompts = load_prompts(prompt_file, limit=limit)
    return run_curves(run_dirs, prompts, spec_for(prompts, **spec_options), make_reward(reward, weights), out_dir,
                      weights, progress=progress, overwrite=overwrite)


def _first_lines(err: Exception) -> str:
    """One line for a loader's error: torch lists every mismatched weight of a LoRA for another base model."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    mismatched = [line for line in lines if line.startswith("size mismatch")]
    if mismatched:
        return f"{len(mismatched)} weight(s) have other shapes than this model's, e.g. {mismatched[0]}"
    return lines[0] if lines else type(err).__name__


def _check_lora_fits(pipe, lora: Path, model) -> None:
    """Refuse a diffusers-format U-Net (or transformer) LoRA whose layers this model lacks or has in other shapes (peft would
    load the rest with only a warning: a LoRA for another base model would silently do half its job)."""
    from safetensors import safe_open

    file = lora if lora.is_file() else lora / "pytorch_lora_weights.safetensors"
    attribute = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    denoiser = getattr(pipe, attribute, None)
    if denoiser is None or not file.is_file():
        return
    prefix = f"{attribute}."
    modules = dict(denoiser.named_modules())
    missing, mismatched = [], []
    with safe_open(str(file), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
            down = ".lora_A." if ".lora_A." in key else ".lora.down."  # peft's or diffusers' own key names
            if not key.startswith(prefix) or down not in key:
                continue  # kohya keys, text-encoder LoRAs: diffusers' own loader checks those
            name = key[len(prefix):].split(down)[0]
            module = modules.get(name)
            shape = f.get_slice(key).get_shape()
            if module is None or not hasattr(module, "weight"):
                missing.append(name)
            elif shape[1] != module.weight.shape[1]:  # lora_A/down is (rank, in[, kh, kw]) for linear and conv alike
                mismatched.append(name)
    if missing or mismatched:
        example = (missing or mismatched)[0]
        raise UsageError(f"--lora {lora}: not a LoRA for {model}: {len(missing)} of its layers are not in this model "
                         f"and {len(mismatched)} have other shapes (e.g. {example}); was it trained on another base model?")
