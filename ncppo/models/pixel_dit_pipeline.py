"""The toy world's transformer model class: :class:`~ncppo.models.pixel_pipeline.PixelTextToImagePipeline` with a
DiT in place of the U-Net.

A ``PixArtTransformer2DModel`` on RGB pixels (patch embedding, adaLN-single timestep, cross-attention to the CLIP
tokens, no resolution conditions), the same CLIP text encoder, tokenizer, scheduler and sampling loop. Trained and
adapted like PixArt-Sigma (its LoRA is peft's: diffusers has no LoRA loader for a PixArt transformer). Loaded with
``ncppo.models.loading.load_pipeline``.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from ncppo.models.pixel_pipeline import PixelSampling
from ncppo.models.transformers_backbone import PIXART_NO_SIZE


class PixelDiTPipeline(PixelSampling, DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)

    @property
    def denoiser(self):
        return self.transformer

    def denoise(self, sample, t, embeds):
        timestep = torch.as_tensor(t, device=sample.device).expand(sample.shape[0])
        out = self.transformer(sample, encoder_hidden_states=embeds, timestep=timestep,
                               added_cond_kwargs=dict(PIXART_NO_SIZE)).sample
        return out[:, : sample.shape[1]]  # a learned-variance DiT's second half is its variance
