"""What differs between the denoisers ncppo trains, in one table: U-Nets (SD1.5, SDXL, pixel), the SD3-class
MMDiT, the FLUX.1-class transformer (2x2-packed latent tokens, rotary position ids, guidance embedding) and
PixArt-Sigma's DiT (DDPM with learned variance, cross-attention to masked T5 tokens).
:class:`~ncppo.models.preference_model.PreferenceModel` reads it; the training step, the objectives and the
trainer never see it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ncppo.batch import Condition
from ncppo.errors import UsageError

# MMDiT's joint attention has a text-stream twin of each image-stream projection: a LoRA "on the attention
# projections" adapts both (as diffusers' SD3 LoRA scripts do).
MMDIT_CONTEXT_TWINS = {"to_q": "add_q_proj", "to_k": "add_k_proj", "to_v": "add_v_proj", "to_out.0": "to_add_out"}


@dataclass(frozen=True)
class Backbone:
    """One denoiser family: where the pipeline keeps it and how it is called, adapted and saved."""

    attribute: str  # the pipeline's component: "unet" or "transformer"
    family: str  # how it is called: "unet", "sd3", "flux" or "pixart"
    text_width_key: str  # the config key of the prompt embeddings' width
    needs_pooled: bool  # the condition carries a pooled text embedding (Condition.text_embeds)
    context_twins: bool = False  # MMDiT: LoRA targets gain their text-stream twins
    needs_mask: bool = False  # the text condition carries its padding mask (PixArt's T5 tokens)

    def denoiser(self, pipeline):
        return getattr(pipeline, self.attribute)

    def latent_channels(self, denoiser) -> int:
        """Channels of the latents (the diffusion variable): FLUX's input packs 2x2 patches of them."""
        return denoiser.config.in_channels // (4 if self.family == "flux" else 1)

    def lora_targets(self, targets: tuple[str, ...]) -> tuple[str, ...]:
        if not self.context_twins:
            return tuple(targets)
        return tuple(targets) + tuple(MMDIT_CONTEXT_TWINS[t] for t in targets if t in MMDIT_CONTEXT_TWINS)

    def forward(self, denoiser, x, timestep, condition: Condition):
        """The model output at ``x`` (in the denoiser's dtype) and the network's ``timestep``, in the latents' layout
        (FLUX's tokens unpacked, PixArt's variance half dropped)."""
        if self.family == "unet":
            return denoiser(x, timestep, **condition.unet_kwargs(), return_dict=False)[0]
        if self.family == "pixart":
            out = denoiser(x, encoder_hidden_states=condition.encoder_hidden_states, timestep=timestep,
                           added_cond_kwargs=dict(PIXART_NO_SIZE), encoder_attention_mask=condition.attention_mask,
                           return_dict=False)[0]
            return out[:, : x.shape[1]]  # learned variance: the first half is the noise prediction
        if self.family == "sd3":
            return denoiser(hidden_states=x, timestep=timestep, encoder_hidden_states=condition.encoder_hidden_states,
                            pooled_projections=condition.text_embeds, return_dict=False)[0]
        return flux_forward(denoiser, x, timestep, condition)

    def add_lora(self, denoiser, config) -> None:
        """LoRA adapters from a peft ``LoraConfig``: diffusers' ``add_adapter`` where the model has it; else (PixArt,
        whose diffusers class has no adapter mixin) peft's own injection, with the config where diffusers keeps it."""
        if hasattr(denoiser, "add_adapter"):
            denoiser.add_adapter(config)
            return
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, denoiser, adapter_name="default")
        denoiser.peft_config = {"default": config}

    def lora_save_kwargs(self, layers: dict, metadata: dict) -> dict:
        """Keywords for ``Pipeline.save_lora_weights`` (``unet_lora_layers`` or ``transformer_lora_layers``)."""
        return {f"{self.attribute}_lora_layers": layers, f"{self.attribute}_lora_adapter_metadata": metadata}


def encode_text(kind: str, pipeline, prompts: list[str], device):
    """``(embeds, pooled, attention_mask)`` from the pipeline's own ``encode_prompt`` (no classifier-free copy):
    pooled for SDXL, SD3 and FLUX, the T5 padding mask for PixArt, None where a model has none."""
    if kind == "pixart":
        embeds, mask, _, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device=device)
        return embeds, None, mask
    if kind == "sd3":
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompts, None, None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds, pooled, None
    if kind == "flux":
        embeds, pooled, _ = pipeline.encode_prompt(prompts, None, device=device, num_images_per_prompt=1)
        return embeds, pooled, None
    if kind == "sdxl":
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds, pooled, None
    embeds, _ = pipeline.encode_prompt(prompts, device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return embeds, None, None


FLUX_TRAINING_GUIDANCE = 3.5  # diffusers' FLUX.1-dev LoRA scripts' --guidance_scale default


def training_guidance(kind: str, denoiser, guidance: float | None) -> float | None:
    """The guidance value a model trains with: FLUX.1-dev-class models need one, all others refuse one."""
    embeds = kind == "flux" and bool(denoiser.config.get("guidance_embeds", False))
    if embeds:
        return FLUX_TRAINING_GUIDANCE if guidance is None else float(guidance)
    if guidance is not None:
        what = "this FLUX model has no guidance embedding (a schnell-like model)" if kind == "flux" else \
            f"a {kind} model has no guidance embedding"
        raise UsageError(f"guidance {guidance!r} was given but {what}; leave guidance unset")
    return None


UNET = Backbone("unet", "unet", "cross_attention_dim", needs_pooled=False)
BACKBONES = {
    "sd15": UNET,
    "pixel": UNET,
    "sdxl": Backbone("unet", "unet", "cross_attention_dim", needs_pooled=True),
    "sd3": Backbone("transformer", "sd3", "joint_attention_dim", needs_pooled=True, context_twins=True),
    "pixart": Backbone("transformer", "pixart", "caption_channels", needs_pooled=False, needs_mask=True),
    "pixel-dit": Backbone("transformer", "pixart", "caption_channels", needs_pooled=False),  # the toy world's DiT
    "flux": Backbone("transformer", "flux", "joint_attention_dim", needs_pooled=True, context_twins=True),
}


PIXART_NO_SIZE = {"resolution": None, "aspect_ratio": None}  # PixArt-Sigma: no resolution conditions


# -- FLUX.1: the transformer sees 2x2 patches of the latents as tokens, with (0, row, column) position ids ---------
def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, H/2 * W/2, 4C)``, as ``FluxPipeline._pack_latents``."""
    from diffusers import FluxPipeline

    n, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: latent height and width must be even, got {h}x{w}")
    return FluxPipeline._pack_latents(x, n, c, h, w)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` (``FluxPipeline._unpack_latents`` counts in pixels, not latents)."""
    n, _, d = tokens.shape
    c = d // 4
    return tokens.view(n, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, height, width)


def flux_inputs(x: torch.Tensor, timestep: torch.Tensor, condition: Condition) -> dict:
    """The keyword arguments of ``FluxTransformer2DModel.forward`` but ``hidden_states``: text ids are zeros,
    image ids (0, row, column) of the packed grid, and the timestep in [0, 1] (the model multiplies by 1000)."""
    from diffusers import FluxPipeline

    h, w = x.shape[-2:]
    text = condition.encoder_hidden_states
    return dict(
        timestep=timestep / 1000, guidance=condition.guidance, pooled_projections=condition.text_embeds,
        encoder_hidden_states=text,
        txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=text.dtype),
        img_ids=FluxPipeline._prepare_latent_image_ids(x.shape[0], h // 2, w // 2, x.device, text.dtype),
    )


def flux_forward(denoiser, x: torch.Tensor, timestep: torch.Tensor, condition: Condition) -> torch.Tensor:
    out = denoiser(hidden_states=pack_latents(x), **flux_inputs(x, timestep, condition), return_dict=False)[0]
    return unpack_latents(out, *x.shape[-2:])


# -- a LoRA for a pipeline diffusers has no LoRA loader for (PixArt-Sigma in diffusers 0.42) ---------------------
def write_peft_lora(folder, layers: dict, metadata: dict) -> None:
    """``pytorch_lora_weights.safetensors`` with peft's keys under ``transformer.`` and the LoRA config in the
    header (``lora_adapter_metadata``, as diffusers writes it); :func:`load_peft_lora` reads it back."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from ncppo.models.lora_export import LORA_FILE

    tensors = {f"transformer.{k}": v.detach().to("cpu").contiguous() for k, v in layers.items()}
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(metadata, default=sorted)}
    save_file(tensors, str(Path(folder) / LORA_FILE), metadata=header)


def load_peft_lora(pipeline, lora) -> None:
    """Add the LoRA that :func:`write_peft_lora` wrote (a folder or its file) to ``pipeline.transformer`` with peft."""
    import dataclasses
    import json
    from pathlib import Path

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ncppo.models.lora_export import LORA_FILE

    file = Path(lora) / LORA_FILE if Path(lora).is_dir() else Path(lora)
    with safe_open(str(file), "pt") as handle:
        header = dict(handle.metadata() or {})
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(file)).items()}
    if "lora_adapter_metadata" not in header:
        raise ValueError(f"{file}: no lora_adapter_metadata in its header; not a LoRA ncppo wrote for this pipeline")
    saved = json.loads(header["lora_adapter_metadata"])
    names = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    config = LoraConfig(**{k: v for k, v in saved.items() if k in names and k != "peft_type"})
    transformer = pipeline.transformer
    inject_adapter_in_model(config, transformer, adapter_name="default")
    set_peft_model_state_dict(transformer, state, adapter_name="default")
    transformer.peft_config = {"default": config}
