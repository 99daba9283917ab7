"""The public architectures as config dictionaries, and pipelines built from configs alone (no weights).

The presets are the component ``config.json`` files of ``runwayml/stable-diffusion-v1-5`` and
``stabilityai/stable-diffusion-xl-base-1.0`` (nothing can be downloaded here). A local model folder is
read the same way: each component's ``config.json``, never its weights. The pipelines are built on the
``meta`` device: every module and parameter shape is real, no memory is allocated.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ncppo.errors import UsageError

_SD_VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4,
               layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
_CLIP_L = dict(architectures=["CLIPTextModel"], hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
               projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")

PRESETS: dict[str, dict] = {
    "sd15": {
        "pipeline": "StableDiffusionPipeline",
        "unet": dict(act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
                     center_input_sample=False, cross_attention_dim=768,
                     down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
                     flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
                     norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
                     up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
        "vae": _SD_VAE,
        "text_encoder": _CLIP_L,
    },
    "sdxl": {
        "pipeline": "StableDiffusionXLPipeline",
        "unet": dict(act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64,
                     addition_time_embed_dim=256, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
                     center_input_sample=False, cross_attention_dim=2048,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                     downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
                     mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-5, norm_num_groups=32, out_channels=4,
                     projection_class_embeddings_input_dim=2816, sample_size=128,
                     transformer_layers_per_block=[1, 2, 10],
                     up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                     use_linear_projection=True),
        "vae": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder": {**_CLIP_L, "projection_dim": 768},
        "text_encoder_2": dict(architectures=["CLIPTextModelWithProjection"], hidden_size=1280,
                               intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                               max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280,
                               bos_token_id=0, eos_token_id=2, pad_token_id=1),
    },
}
PRESET_NAMES = tuple(PRESETS)
_COMPONENTS = {"StableDiffusionPipeline": ("unet", "vae", "text_encoder"),
               "StableDiffusionXLPipeline": ("unet", "vae", "text_encoder", "text_encoder_2")}


def read_configs(name_or_path: str) -> dict:
    """The component configs of a preset name or a local diffusers folder (``model_index.json`` + one
    ``config.json`` per component), as ``{"pipeline": class name, "unet": {...}, ...}``."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        raise UsageError(f"model.pretrained: {name_or_path} is not a folder; give a diffusers pipeline folder or a "
                         f"preset ({', '.join(PRESET_NAMES)}), e.g. model.pretrained=sdxl")
    index_path = folder / "model_index.json"
    index = _read_json(index_path)
    pipeline = index.get("_class_name")
    if pipeline not in _COMPONENTS:
        raise UsageError(f"{index_path}: _class_name {pipeline!r} is not one ncppo plans for "
                         f"({', '.join(_COMPONENTS)})")
    configs = {"pipeline": pipeline}
    for component in _COMPONENTS[pipeline]:
        path = folder / component / "config.json"
        if not path.is_file():
            raise UsageError(f"{folder}: the {component} component has no config.json ({path}); the estimate reads "
                             "every component's config (not its weights): copy the folder's config files whole")
        configs[component] = _read_json(path)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        configs["scheduler"] = _read_json(scheduler)
    return configs


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist (not a diffusers pipeline folder)") from None
    except ValueError as err:
        raise UsageError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise UsageError(f"{path} does not hold a JSON object")
    return value


def _text_encoder(config: dict):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    arch = (config.get("architectures") or ["CLIPTextModel"])[0]
    cls = CLIPTextModelWithProjection if arch == "CLIPTextModelWithProjection" else CLIPTextModel
    keys = {k: v for k, v in config.items() if k != "architectures"}
    return cls(CLIPTextConfig(**keys))


def build_abstract_pipeline(configs: dict, random_unet: torch.dtype | None = None, seed: int = 0, device: str = "cpu"):
    """The pipeline the configs describe, with every parameter on the ``meta`` device (no memory); with
    ``random_unet`` a dtype, its U-Net instead has random weights of that dtype on ``device`` (real-shape checks)."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    scheduler = DDPMScheduler.from_config({**SCHEDULER, **configs.get("scheduler", {})})
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        encoders = [_text_encoder(configs[k]) for k in ("text_encoder", "text_encoder_2") if k in configs]
    if random_unet is not None:
        unet = random_weights(unet, random_unet, seed, device)
    for module in (unet, vae, *encoders):
        module.eval()
    if configs["pipeline"] == "StableDiffusionXLPipeline":
        return StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=scheduler, add_watermarker=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def random_weights(module: torch.nn.Module, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """``module`` (built on ``meta``) with memory on ``device`` in ``dtype`` and random weights drawn there: torch's
    default init (uniform in +-1/sqrt(fan_in)) for matrices and kernels, norms at 1/0, biases 0. Made in
    place of a float32 init and a cast, which would hold both copies (SDXL: 10 + 5 GB)."""
    module = module.to(dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                bound = p[0].numel() ** -0.5
                p.uniform_(-bound, bound, generator=generator)
            elif name.endswith("weight"):  # the only 1-D weights are the norms
                p.fill_(1.0)
            else:
                p.zero_()
    return module
