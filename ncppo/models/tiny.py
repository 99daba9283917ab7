"""Tiny SD1.5-class and SDXL-class pipelines, built fully offline, for tests, examples and benchmarks.

They have the real component classes (CLIP text encoders, AutoencoderKL, UNet2DConditionModel,
a CLIP BPE tokenizer trained here with ``tokenizers``) and random weights, and save in diffusers
format, so every loading and saving path of the project runs on them exactly as on SD1.5/SDXL.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ncppo.errors import UsageError
from ncppo.models.tiny_parts import _vae, default_corpus, tiny_text_encoder, train_clip_tokenizer  # noqa: F401

# SD1.5's and SDXL's training schedule (their scheduler configs carry these values).
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)

TINY_KINDS = ("sd15", "sdxl", "pixel", "pixel-dit", "sd3", "flux", "flux-schnell", "pixart")



def tiny_unet(
    kind: str = "sd15",
    block_out_channels: Sequence[int] = (32, 64),
    cross_attention_dim: int = 32,
    sample_size: int = 16,
    in_channels: int = 4,
    layers_per_block: int = 1,
    seed: int = 0,
):
    """A small ``UNet2DConditionModel`` with SD1.5's (cross-attention down blocks first, a plain last
    block) or SDXL's (a plain first block, ``text_time`` added conditions) block layout."""
    from diffusers import UNet2DConditionModel

    n = len(block_out_channels)
    common = dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
    )
    torch.manual_seed(seed)
    if kind == "sd15":
        down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
        up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
        return UNet2DConditionModel(down_block_types=down, up_block_types=up, **common)
    if kind == "sdxl":
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
        up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
        time_dim = 8
        return UNet2DConditionModel(
            down_block_types=down,
            up_block_types=up,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + cross_attention_dim // 2,
            use_linear_projection=True,
            **common,
        )
    raise UsageError(f"unknown model kind {kind!r}; expected 'sd15' or 'sdxl'")


def build_tiny_pipeline(
    kind: str = "sd15",
    *,
    block_out_channels: Sequence[int] = (32, 64),
    image_size: int = 32,
    prediction_type: str = "epsilon",
    seed: int = 0,
    tokenizer_corpus: Iterable[str] | None = None,
    vae_block_out_channels: Sequence[int] = (16, 32),
):
    """A tiny ``StableDiffusionPipeline`` (``kind='sd15'``), ``StableDiffusionXLPipeline`` (``'sdxl'``),
    VAE-less :class:`~ncppo.models.pixel_pipeline.PixelTextToImagePipeline` (``'pixel'``) or
    ``StableDiffusion3Pipeline`` (``'sd3'``: MMDiT, flow matching; ``prediction_type`` does not apply) or
    ``FluxPipeline`` (``'flux'``: with FLUX.1-dev's guidance embedding; ``'flux-schnell'``: without) or
    ``PixArtSigmaPipeline`` (``'pixart'``: a DiT with DDPM and learned variance) or the VAE-less
    :class:`~ncppo.models.pixel_dit_pipeline.PixelDiTPipeline` (``'pixel-dit'``: a DiT on pixels, the toy DiT's class).

    The default VAE downsamples by 2 (SD's by 8), so a 32x32 image has 16x16 latents; give four
    ``vae_block_out_channels`` (e.g. (32, 64, 128, 128)) for SD's factor of 8.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind in ("sd3", "flux", "flux-schnell", "pixart") and prediction_type != "epsilon":
        raise UsageError(f"prediction_type {prediction_type!r} does not apply to {kind}: its prediction is "
                         "fixed (flow: the velocity; PixArt: epsilon and its variance)")
    if kind == "sd3":  # an MMDiT with flow matching: its own builder (ncppo.models.transformers_tiny)
        from ncppo.models.transformers_tiny import build_tiny_sd3


        return build_tiny_sd3(image_size=image_size, seed=seed, tokenizer_corpus=tokenizer_corpus,
                              vae_block_out_channels=vae_block_out_channels)
    if kind == "pixart":  # a DiT without flow matching (DDPM, learned variance)
        from ncppo.models.transformers_tiny import build_tiny_pixart

        return build_tiny_pixart(image_size=image_size, seed=seed, tokenizer_corpus=tokenizer_corpus,
                                 vae_block_out_channels=vae_block_out_channels)
    if kind in ("flux", "flux-schnell"):  # FLUX.1-dev-like (guidance embedding) or -schnell-like (none)
        from ncppo.models.transformers_tiny import build_tiny_flux

        return build_tiny_flux(seed=seed, guidance_embeds=kind == "flux", tokenizer_corpus=tokenizer_corpus,
                               vae_block_out_channels=vae_block_out_channels)
    tokenizer = train_clip_tokenizer(tokenizer_corpus)
    scheduler = DDIMScheduler(prediction_type=prediction_type, **SD_SCHEDULER_CONFIG)
    vae = _vae(4, seed + 1, vae_block_out_channels)
    latent_size = image_size // 2 ** (len(vae_block_out_channels) - 1)
    if kind == "sd15":
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=tiny_text_encoder(len(tokenizer), 32, False, seed + 2),
            tokenizer=tokenizer,
            unet=tiny_unet("sd15", block_out_channels, 32, latent_size, seed=seed).eval(),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if kind == "sdxl":
        # SDXL concatenates both encoders' hidden states (16 + 16) and adds te2's pooled projection.
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=tiny_text_encoder(len(tokenizer), 16, False, seed + 2),
            text_encoder_2=tiny_text_encoder(len(tokenizer), 16, True, seed + 3),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=tiny_unet("sdxl", block_out_channels, 32, latent_size, seed=seed).eval(),
            scheduler=scheduler,
        )
    if kind == "pixel":
        from ncppo.models.pixel_pipeline import PixelTextToImagePipeline

        return PixelTextToImagePipeline(
            unet=tiny_unet("sd15", block_out_channels, 32, image_size, in_channels=3, seed=seed).eval(),
            text_encoder=tiny_text_encoder(len(tokenizer), 32, False, seed + 2),
            tokenizer=tokenizer,
            scheduler=scheduler,
        )
    if kind == "pixel-dit":
        from diffusers import PixArtTransformer2DModel

        from ncppo.models.pixel_dit_pipeline import PixelDiTPipeline

        torch.manual_seed(seed)
        transformer = PixArtTransformer2DModel(
            sample_size=image_size, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
            in_channels=3, out_channels=3, cross_attention_dim=16, caption_channels=32, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
        ).eval()
        return PixelDiTPipeline(transformer=transformer, text_encoder=tiny_text_encoder(len(tokenizer), 32, False, seed + 2),
                                tokenizer=tokenizer, scheduler=scheduler)
    raise UsageError(f"unknown model kind {kind!r}; expected one of {', '.join(TINY_KINDS)}")


def save_tiny_pipeline(out_dir: str | Path, kind: str = "sd15", overwrite: bool = False, **kwargs) -> Path:
    """Build a tiny pipeline and save it in diffusers format (``model_index.json`` + component folders).
    An existing ``out_dir`` that is not an earlier tiny model is refused unless ``overwrite``."""
    from ncppo.io import atomic_directory, guard_output_dir, mark_output_dir

    given = Path(out_dir)
    out_dir = guard_output_dir(given, "tiny-model", overwrite=overwrite)
    pipe = build_tiny_pipeline(kind, **kwargs)
    with atomic_directory(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        mark_output_dir(tmp, "tiny-model")
    return given
