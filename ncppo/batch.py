"""The data a training step consumes: a batch of preference pairs and the text condition ``c``.

A :class:`PreferenceBatch` may carry raw inputs (pixels in [-1, 1], prompt strings) or encoded ones
(latents, prompt embeddings, SDXL pooled embeddings and ``time_ids``), in any mix: the model encodes
what is missing, so batches from a latent cache and from raw images go through the same step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch


@dataclass
class Condition:
    """The text condition ``c`` for a batch of images (METHOD.md notation)."""

    encoder_hidden_states: torch.Tensor  # (N, L, D)
    text_embeds: torch.Tensor | None = None  # SDXL pooled prompt embedding, (N, D2)
    time_ids: torch.Tensor | None = None  # SDXL micro-conditioning, (N, 6)
    guidance: torch.Tensor | None = None  # FLUX.1-dev's distilled guidance scale, (N,)
    attention_mask: torch.Tensor | None = None  # the text tokens attended to (PixArt's T5 padding mask), (N, L)

    @property
    def batch_size(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def unet_kwargs(self) -> dict:
        """Keyword arguments for ``UNet2DConditionModel.forward`` (and the perceptual encoder)."""
        added = None
        if self.text_embeds is not None or self.time_ids is not None:
            added = {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        if self.guidance is not None:  # only a guidance-distilled transformer has one
            added = {**(added or {}), "guidance": self.guidance}
        if self.attention_mask is not None:  # only a text-masked transformer (PixArt) has one
            added = {**(added or {}), "encoder_attention_mask": self.attention_mask}
        return {"encoder_hidden_states": self.encoder_hidden_states, "added_cond_kwargs": added}

    def map(self, fn) -> Condition:
        return Condition(*(None if v is None else fn(v) for v in (
            self.encoder_hidden_states, self.text_embeds, self.time_ids, self.guidance, self.attention_mask)))

    def repeat(self, n: int) -> Condition:
        """The same condition for ``n`` stacked copies of the batch (winners, losers, ...)."""
        return self.map(lambda v: torch.cat([v] * n))

    @staticmethod
    def cat(conditions: Sequence[Condition]) -> Condition:
        fields_ = []
        for name in ("encoder_hidden_states", "text_embeds", "time_ids", "guidance", "attention_mask"):
            values = [getattr(c, name) for c in conditions]
            if any(v is None for v in values) and not all(v is None for v in values):
                raise ValueError(f"cannot concatenate conditions where only some have {name}")
            fields_.append(None if values[0] is None else torch.cat(values))
        return Condition(*fields_)


@dataclass
class PreferenceBatch:
    """``B`` pairs ``(c, x^w, x^l)``: winner and loser images for the same prompt.

    Give either ``latents_w``/``latents_l`` (already scaled by the VAE's ``scaling_factor``) or
    ``pixel_values_w``/``pixel_values_l`` (in [-1, 1]); and either ``prompt_embeds`` (plus for SDXL, SD3 and FLUX
    ``pooled_prompt_embeds``, for PixArt ``prompt_attention_mask``) or ``prompts``. SDXL ``time_ids_w``/``time_ids_l``
    default to the image size with no crop.
    """

    latents_w: torch.Tensor | None = None
    latents_l: torch.Tensor | None = None
    pixel_values_w: torch.Tensor | None = None
    pixel_values_l: torch.Tensor | None = None
    prompts: list[str] | None = None
    prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    prompt_attention_mask: torch.Tensor | None = None  # PixArt: which T5 tokens are the prompt's, (B, L)
    time_ids_w: torch.Tensor | None = None
    time_ids_l: torch.Tensor | None = None
    ids: list = field(default_factory=list)  # row/pair ids, for error reports
    is_tie: torch.Tensor | None = None  # with tie policy 'keep': which pairs are ties (label 0.5)

    @property
    def batch_size(self) -> int:
        for value in (self.latents_w, self.pixel_values_w, self.prompt_embeds):
            if value is not None:
                return value.shape[0]
        if self.prompts is not None:
            return len(self.prompts)
        raise ValueError("empty PreferenceBatch: give latents or pixel values, and prompts or prompt embeddings")

    def replace(self, **changes) -> PreferenceBatch:
        return replace(self, **changes)


@dataclass
class EncodedPairs:
    """A batch ready for the step: latents and one condition per side (SDXL sizes may differ by side)."""

    latents_w: torch.Tensor
    latents_l: torch.Tensor
    condition_w: Condition
    condition_l: Condition
    ids: list = field(default_factory=list)
    is_tie: torch.Tensor | None = None  # bool (B,): tied pairs (trained with a symmetric loss)

    @property
    def batch_size(self) -> int:
        return self.latents_w.shape[0]
