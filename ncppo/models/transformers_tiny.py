"""Tiny transformer pipelines (SD3-class MMDiT, FLUX.1-class; flow matching), built offline, for tests and examples.

Real component classes with random weights: ``SD3Transformer2DModel``, two ``CLIPTextModelWithProjection``
encoders and a ``T5EncoderModel`` with tokenizers trained here (``tokenizers``: a CLIP BPE and a T5
Unigram model), an ``AutoencoderKL`` with SD3's ``shift_factor`` and a ``FlowMatchEulerDiscreteScheduler``
with SD3's ``shift = 3``, saved as a ``StableDiffusion3Pipeline`` folder that ``load_pipeline`` loads; and the
same for ``FluxPipeline`` (``FluxTransformer2DModel``, CLIP + T5, FLUX's resolution-dependent shift).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

SD3_SHIFT = 3.0  # SD3 / SD3.5's scheduler config


def train_t5_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 300, model_max_length: int = 64):
    """A T5 (Unigram) tokenizer trained offline on ``corpus`` (default: the built-in one)."""
    from transformers import T5TokenizerFast

    from ncppo.models.tiny_parts import default_corpus

    base = T5TokenizerFast(model_max_length=model_max_length)
    text = list(corpus) if corpus is not None else default_corpus()
    return base.train_new_from_iterator(text, vocab_size=vocab_size)


def tiny_t5_encoder(vocab_size: int, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=d_model * 2, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def tiny_sd3_transformer(sample_size: int = 16, in_channels: int = 4, num_layers: int = 4, heads: int = 2,
                         head_dim: int = 8, joint_attention_dim: int = 32, pooled_projection_dim: int = 32,
                         seed: int = 0):
    """An ``SD3Transformer2DModel`` (MMDiT, 2x2 patches, SD3.5's RMS q/k norm) of ``num_layers`` joint blocks."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=in_channels, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_attention_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled_projection_dim,
        out_channels=in_channels, pos_embed_max_size=max(32, sample_size), qk_norm="rms_norm",
    ).eval()


def build_tiny_sd3(*, image_size: int = 32, num_layers: int = 4, seed: int = 0,
                   tokenizer_corpus: Iterable[str] | None = None,
                   vae_block_out_channels: Sequence[int] = (16, 32)):
    """A tiny ``StableDiffusion3Pipeline``: CLIP widths 16 + 16 (padded to T5's 32 and joined along the
    sequence, as SD3), pooled 16 + 16, latents of ``image_size / 2`` with 4 channels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from ncppo.models.tiny_parts import _vae, tiny_text_encoder, train_clip_tokenizer

    corpus = list(tokenizer_corpus) if tokenizer_corpus is not None else None
    clip_tokenizer = train_clip_tokenizer(corpus)
    t5_tokenizer = train_t5_tokenizer(corpus)
    vae = _vae(4, seed + 1, vae_block_out_channels)
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5305)  # SD3's VAE normalisation constants
    latent_size = image_size // 2 ** (len(vae_block_out_channels) - 1)
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(latent_size, 4, num_layers, seed=seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT),
        vae=vae,
        text_encoder=tiny_text_encoder(len(clip_tokenizer), 16, True, seed + 2),
        tokenizer=clip_tokenizer,
        text_encoder_2=tiny_text_encoder(len(clip_tokenizer), 16, True, seed + 3),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=tiny_t5_encoder(len(t5_tokenizer), 32, seed + 4),
        tokenizer_3=t5_tokenizer,
    )


FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)  # FLUX.1's scheduler config


def tiny_flux_transformer(latent_channels: int = 4, num_layers: int = 2, num_single_layers: int = 2,
                          guidance_embeds: bool = True, seed: int = 0):
    """A ``FluxTransformer2DModel``: double-stream then single-stream blocks over 2x2-packed latents with rotary
    positions; ``guidance_embeds`` as the distilled FLUX.1-dev (False: as FLUX.1-schnell)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=latent_channels * 4, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    ).eval()


def build_tiny_flux(*, seed: int = 0, guidance_embeds: bool = True, tokenizer_corpus: Iterable[str] | None = None,
                    vae_block_out_channels: Sequence[int] = (16, 32)):
    """A tiny ``FluxPipeline``: CLIP (pooled, width 16) and T5 (width 32) text encoders, 4-channel latents packed
    2x2 into 16-wide tokens, FLUX's resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from ncppo.models.tiny_parts import _vae, tiny_text_encoder, train_clip_tokenizer

    corpus = list(tokenizer_corpus) if tokenizer_corpus is not None else None
    clip_tokenizer = train_clip_tokenizer(corpus)
    t5_tokenizer = train_t5_tokenizer(corpus)
    vae = _vae(4, seed + 1, vae_block_out_channels)
    vae.register_to_config(shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's VAE normalisation constants
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=tiny_text_encoder(len(clip_tokenizer), 16, False, seed + 2),
        tokenizer=clip_tokenizer,
        text_encoder_2=tiny_t5_encoder(len(t5_tokenizer), 32, seed + 4),
        tokenizer_2=t5_tokenizer,
        transformer=tiny_flux_transformer(4, guidance_embeds=guidance_embeds, seed=seed),
    )


PIXART_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon")


def tiny_pixart_transformer(sample_size: int = 16, in_channels: int = 4, num_layers: int = 4, seed: int = 0):
    """A ``PixArtTransformer2DModel`` as PixArt-Sigma: adaLN-single, cross-attention to T5 tokens, learned variance
    (``out_channels = 2 in_channels``), no resolution conditions."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=num_layers, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        in_channels=in_channels, out_channels=2 * in_channels, cross_attention_dim=16, caption_channels=32,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
    ).eval()


def build_tiny_pixart(*, image_size: int = 32, seed: int = 0, tokenizer_corpus: Iterable[str] | None = None,
                      vae_block_out_channels: Sequence[int] = (16, 32)):
    """A tiny ``PixArtSigmaPipeline``: T5 (width 32, its tokenizer trained here), DDPM's linear schedule under
    PixArt's DPM-Solver, a DiT predicting epsilon and its variance."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    from ncppo.models.tiny_parts import _vae

    tokenizer = train_t5_tokenizer(list(tokenizer_corpus) if tokenizer_corpus is not None else None)
    latent_size = image_size // 2 ** (len(vae_block_out_channels) - 1)
    return PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=tiny_t5_encoder(len(tokenizer), 32, seed + 4),
        vae=_vae(4, seed + 1, vae_block_out_channels), transformer=tiny_pixart_transformer(latent_size, 4, seed=seed),
        scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER),
    )
