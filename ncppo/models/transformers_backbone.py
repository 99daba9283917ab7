"""What differs between the denoisers ncppo trains, in one table: U-Nets (SD1.5, SDXL, pixel) and the
SD3-class MMDiT transformer. :class:`~ncppo.models.preference_model.PreferenceModel` reads it; the training
step, the objectives and the trainer never see it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ncppo.batch import Condition

# MMDiT's joint attention has a text-stream twin of each image-stream projection: a LoRA "on the attention
# projections" adapts both (as diffusers' SD3 LoRA scripts do).
MMDIT_CONTEXT_TWINS = {"to_q": "add_q_proj", "to_k": "add_k_proj", "to_v": "add_v_proj", "to_out.0": "to_add_out"}


@dataclass(frozen=True)
class Backbone:
    """One denoiser family: where the pipeline keeps it and how it is called, adapted and saved."""

    attribute: str  # the pipeline's component: "unet" or "transformer"
    text_width_key: str  # the config key of the prompt embeddings' width
    needs_pooled: bool  # the condition carries a pooled text embedding (Condition.text_embeds)
    context_twins: bool = False  # MMDiT: LoRA targets gain their text-stream twins

    def denoiser(self, pipeline):
        return getattr(pipeline, self.attribute)

    def lora_targets(self, targets: tuple[str, ...]) -> tuple[str, ...]:
        if not self.context_twins:
            return tuple(targets)
        return tuple(targets) + tuple(MMDIT_CONTEXT_TWINS[t] for t in targets if t in MMDIT_CONTEXT_TWINS)

    def forward(self, denoiser, x, timestep, condition: Condition):
        """The raw model output at ``x`` (in the denoiser's dtype) and the network's ``timestep``."""
        if self.attribute == "unet":
            return denoiser(x, timestep, **condition.unet_kwargs(), return_dict=False)[0]
        return denoiser(hidden_states=x, timestep=timestep, encoder_hidden_states=condition.encoder_hidden_states,
                        pooled_projections=condition.text_embeds, return_dict=False)[0]

    def lora_save_kwargs(self, layers: dict, metadata: dict) -> dict:
        """Keywords for ``Pipeline.save_lora_weights`` (``unet_lora_layers`` or ``transformer_lora_layers``)."""
        return {f"{self.attribute}_lora_layers": layers, f"{self.attribute}_lora_adapter_metadata": metadata}


UNET = Backbone("unet", "cross_attention_dim", needs_pooled=False)
BACKBONES = {
    "sd15": UNET,
    "pixel": UNET,
    "sdxl": Backbone("unet", "cross_attention_dim", needs_pooled=True),
    "sd3": Backbone("transformer", "joint_attention_dim", needs_pooled=True, context_twins=True),
}
