"""Loading SD1.5-, SDXL-, SD3- and FLUX.1-class pipelines from a local diffusers folder (or a hub id when online)."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ncppo.errors import NcppoError

SUPPORTED_PIPELINES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl",
                       "PixelTextToImagePipeline": "pixel", "StableDiffusion3Pipeline": "sd3",
                       "FluxPipeline": "flux", "PixArtSigmaPipeline": "pixart", "PixelDiTPipeline": "pixel-dit"}
# the project's own pipeline classes, which diffusers' generic loader cannot resolve by name
# PixArt's pipeline moves the asked size to its aspect-ratio table's nearest entry (and refuses transformers of other
# sample sizes, e.g. the tiny one) and cleans captions with an optional package; ncppo samples the size it asks for.
CALL_OPTIONS = {"PixArtSigmaPipeline": {"use_resolution_binning": False, "clean_caption": False}}


def call_options(pipe) -> dict:
    """The keyword arguments every call of ``pipe`` gets (:data:`CALL_OPTIONS` of its class; usually none):
    sampling in evaluation and the trainer's validation images alike."""
    return dict(CALL_OPTIONS.get(type(pipe).__name__, {}))


def render_images(pipe, prompts: list[str], seeds: list[int], num_inference_steps: int, guidance_scale: float | None,
                  height: int | None = None, width: int | None = None) -> np.ndarray:
    """uint8 images ``(n, H, W, 3)``, image ``i`` of ``prompts[i]`` drawn from its own generator seeded with
    ``seeds[i]``: the one rendering rule (``ncppo generate``, ``ncppo curve``, the toy world, the trainer's
    validation images), so an image depends on its seed only, never on its batch, and a pipeline is called with
    its :func:`call_options`. ``guidance_scale`` None: the pipeline's default."""
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    kwargs = {"height": height, "width": width} if height is not None or width is not None else {}
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    images = pipe(list(prompts), num_inference_steps=num_inference_steps, output_type="np", generator=generators,
                  **call_options(pipe), **kwargs).images
    return (np.asarray(images) * 255).round().astype(np.uint8)


_OWN_PIPELINES = {"PixelTextToImagePipeline": ("ncppo.models.pixel_pipeline", "PixelTextToImagePipeline"),
                  "PixelDiTPipeline": ("ncppo.models.pixel_dit_pipeline", "PixelDiTPipeline")}


class ModelLoadError(NcppoError, RuntimeError):
    """A model could not be loaded; the message says what to do."""


def pipeline_kind(pipeline) -> str:
    """The kind (``'sd15'``, ``'sdxl'``, ``'pixel'``, ``'pixel-dit'``, ``'sd3'``, ``'flux'``, ``'pixart'``) of a loaded
    pipeline; an error naming the
    supported classes for anything else."""
    name = type(pipeline).__name__
    if name not in SUPPORTED_PIPELINES:
        raise ModelLoadError(
            f"unsupported pipeline class {name}; ncppo trains {', '.join(SUPPORTED_PIPELINES)} models"
        )
    return SUPPORTED_PIPELINES[name]


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def load_pipeline(name_or_path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None):
    """Load a text-to-image pipeline from a diffusers-format directory, or a hub id when online.

    Offline (no network, or ``HF_HUB_OFFLINE=1``) a hub id is looked up in the local cache only and
    a miss fails at once with a message naming the id, instead of hanging on the network.
    """
    from diffusers import DiffusionPipeline

    path = Path(name_or_path).expanduser()
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{path} is not a diffusers pipeline directory (no model_index.json). Save one with "
                "`pipe.save_pretrained(DIR)` or build a tiny one with `ncppo tiny-model DIR`."
            )
        pipeline_class = DiffusionPipeline
        try:
            class_name = json.loads((path / "model_index.json").read_text()).get("_class_name")
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{path / 'model_index.json'} is not readable JSON ({err})") from err
        if class_name in _OWN_PIPELINES:
            module, attr = _OWN_PIPELINES[class_name]
            pipeline_class = getattr(importlib.import_module(module), attr)
        try:
            pipe = pipeline_class.from_pretrained(path, **kwargs)
        except Exception as err:  # diffusers raises many types for broken folders
            raise ModelLoadError(f"could not load the pipeline in {path}: {err}") from err
        pipeline_kind(pipe)
        return pipe
    name = str(name_or_path)
    if not _is_hub_id(name):
        raise ModelLoadError(f"{name} does not exist (expected a diffusers pipeline directory or a hub id)")
    try:  # the local cache first: it needs no network
        pipe = DiffusionPipeline.from_pretrained(name, local_files_only=True, **kwargs)
    except Exception as cache_err:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise ModelLoadError(
                f"{name!r} is not a local directory and is not in the Hugging Face cache, and the hub is "
                "offline (HF_HUB_OFFLINE=1). Download the model where there is a network and pass its "
                "local directory."
            ) from cache_err
        try:
            pipe = DiffusionPipeline.from_pretrained(name, **kwargs)
        except Exception as err:
            raise ModelLoadError(
                f"could not fetch {name!r} from the Hugging Face hub ({type(err).__name__}: {err}). If this "
                "machine is offline, download the model elsewhere and pass its local directory."
            ) from err
    pipeline_kind(pipe)
    return pipe
