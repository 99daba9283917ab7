"""A text-to-image pipeline prepared for preference training: the policy, its reference, and encoders.

The policy is the pipeline's U-Net with LoRA adapters (peft) or fully trainable. The reference
``eps_ref`` and the perceptual encoder ``f`` both use the *frozen pretrained* U-Net: with LoRA that is
the same U-Net with its adapters disabled (no second copy in memory); with a full fine-tune, a frozen
copy made before training. "U-Net" (``model.unet``) names the denoiser: for SD3, FLUX and PixArt it is the
pipeline's transformer; what differs per family is in :mod:`ncppo.models.transformers_backbone`, and the
process (DDPM or flow matching) is ``model.schedule``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from ncppo.batch import Condition, EncodedPairs, PreferenceBatch
from ncppo.errors import UsageError
from ncppo.flow import process_for
from ncppo.io import atomic_directory
from ncppo.models.difference_pass import difference_forward, gradient_checkpointing_function, install_hooks
from ncppo.models.loading import load_pipeline, pipeline_kind
from ncppo.models.transformers_backbone import BACKBONES, encode_text, training_guidance
from ncppo.precision import compute_dtypes

FINETUNE_MODES = ("lora", "full", "none")  # none: frozen, for encoding and sampling
REFERENCE_PASSES = ("auto", "separate", "difference")  # how eps_theta and eps_ref are computed together


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the U-Net (the paper: rank 64 on the attention projections, as Diffusion-DPO)."""

    rank: int = 64
    alpha: float | None = None  # None: alpha = rank (scale 1), as diffusers' DPO example
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    dropout: float = 0.0

    def peft_config(self):
        from peft import LoraConfig

        if self.rank < 1:
            raise UsageError(f"LoRA rank must be >= 1, got {self.rank}")
        # 'gaussian' init keeps B = 0, so at step 0 the policy equals the reference exactly.
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            lora_dropout=self.dropout,
            init_lora_weights="gaussian",
            target_modules=list(self.target_modules),
        )


class PreferenceModel:
    """Wraps a SD1.5-/SDXL-/SD3-/FLUX-class pipeline for training; see the module docstring.

    ``guidance`` is the distilled guidance scale a FLUX.1-dev-class transformer is conditioned on while training
    (default ``transformers_backbone.FLUX_TRAINING_GUIDANCE``); a model without a guidance embedding refuses one.
    ``timestep_weighting`` chooses a flow model's training sigmas (:data:`ncppo.flow.WEIGHTINGS`; default
    ``logit_normal``, SD3's); DDPM models draw ``t`` uniformly, as Diffusion-DPO, and refuse the option.
    ``reference_pass`` (:data:`REFERENCE_PASSES`) is how an objective that needs ``eps_ref`` gets it with
    ``eps_theta``: ``separate`` runs the reference as its own pass; ``difference`` (LoRA only) runs one pass that
    carries the reference's activations and the policy's difference from them
    (:mod:`ncppo.models.difference_pass`), which keeps DPO's argument in bf16; ``auto`` is ``difference`` for a
    LoRA computing in bf16 (weights or autocast) and ``separate`` otherwise (fp16 and float32 keep the difference
    in two passes, which cost fewer FLOPs).
    """

    def __init__(self, pipeline, *, finetune: str = "lora", lora: LoraSettings | None = None,
                 guidance: float | None = None, timestep_weighting: str | None = None,
                 reference_pass: str = "auto"):
        if finetune not in FINETUNE_MODES:
            raise UsageError(f"unknown finetune mode {finetune!r}; expected one of {FINETUNE_MODES}")
        if reference_pass not in REFERENCE_PASSES:
            raise UsageError(f"unknown reference pass {reference_pass!r}; expected one of {REFERENCE_PASSES}")
        if reference_pass == "difference" and finetune != "lora":
            raise UsageError("reference_pass 'difference' needs finetune 'lora' (the reference is the base under the "
                             "adapters); a full fine-tune uses 'separate'")
        self.reference_pass = reference_pass
        self.pipeline = pipeline
        self.kind = pipeline_kind(pipeline)
        self.backbone = BACKBONES[self.kind]
        self.unet = self.backbone.denoiser(pipeline)  # the denoiser: a U-Net or (SD3, FLUX) a transformer
        self.guidance = training_guidance(self.kind, self.unet, guidance)
        if getattr(self.unet, "use_additional_conditions", False):
            raise UsageError("PixArt transformers with resolution conditions (PixArt-alpha at 1024 px) are not supported "
                             "yet; PixArt-Sigma's (use_additional_conditions false) are")
        self.policy = self.unet  # what runs the policy forward: see use_policy (a DDP-wrapped U-Net)
        self.finetune = finetune
        weighting = {} if timestep_weighting is None else {"weighting": timestep_weighting}
        self.schedule = process_for(pipeline.scheduler, **weighting)  # DDPM or flow: the step never asks which
        for module in self._frozen_components():
            module.requires_grad_(False)
        self.reference_unet = None
        self._fp32_encoder = None  # made on first use by perceptual_encoder("fp32") under half precision
        if finetune == "lora":
            from peft.tuners.tuners_utils import BaseTunerLayer

            self.lora = lora or LoraSettings()
            # MMDiT: each attention projection's text-stream twin is adapted too
            self.lora = replace(self.lora, target_modules=self.backbone.lora_targets(self.lora.target_modules))
            self.unet.requires_grad_(False)
            self.backbone.add_lora(self.unet, self.lora.peft_config())
            self._adapter_layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
            install_hooks(self._adapter_layers)  # inert outside a difference pass: any pass can be chosen later
            self._checkpointable = [m for m in self.unet.modules() if hasattr(m, "gradient_checkpointing")]
        elif finetune == "full":
            self.lora = None
            self.reference_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
            self.unet.requires_grad_(True)
        else:
            self.lora = None
            self.unet.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, name_or_path, *, torch_dtype=None, **kwargs) -> PreferenceModel:
        return cls(load_pipeline(name_or_path, torch_dtype=torch_dtype), **kwargs)

    # -- components ------------------------------------------------------------------------------
    def _frozen_components(self) -> list[torch.nn.Module]:
        names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(self.pipeline, n, None) for n in names) if m is not None]

    def set_frozen_dtype(self, dtype: torch.dtype | None) -> None:
        """Keep the frozen weights (VAE, text encoders, the U-Net under a LoRA) in ``dtype`` (None: as they
        are), the trained parameters in float32: the mixed-precision set-up of Diffusion-DPO and the paper."""
        if dtype is None:
            return
        for module in self._frozen_components():
            module.to(dtype=dtype)
        if self.lora is not None:
            self.unet.to(dtype=dtype)
            for p in self.trainable_parameters():
                p.data = p.data.float()
        elif self.reference_unet is not None:
            self.reference_unet.to(dtype=dtype)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device) -> PreferenceModel:
        self.pipeline.to(device)
        if self.reference_unet is not None:
            self.reference_unet.to(device)
        if self._fp32_encoder is not None:
            self._fp32_encoder.to(device)
        self.schedule = self.schedule.to(device)
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.nn.Parameter]:
        """The trained parameters by name: what a training checkpoint holds and a resume restores."""
        return {n: p for n, p in self.unet.named_parameters() if p.requires_grad}

    def use_policy(self, module: torch.nn.Module) -> None:
        """Run the policy forward through ``module``: this model's U-Net as wrapped for distributed training
        (the first value of ``accelerator.prepare(model.unet, optimizer)``)."""
        if module is not self.unet and getattr(module, "module", None) is not self.unet:
            raise ValueError("use_policy: the module does not wrap this model's U-Net")
        self.policy = module

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint the denoiser's blocks (non-reentrant, as diffusers' default; a difference pass recomputes as
        one)."""
        self.unet.enable_gradient_checkpointing(gradient_checkpointing_function)

    @contextlib.contextmanager
    def frozen_unet(self) -> Iterator[torch.nn.Module]:
        """The frozen pretrained U-Net: the reference ``eps_ref`` and the encoder ``f`` run on it."""
        if self.reference_unet is not None:
            yield self.reference_unet
            return
        if self.lora is None:  # finetune='none': the U-Net is frozen already
            yield self.unet
            return
        # Checkpointed blocks would re-run their forward during backward with the adapters back on.
        with _gradient_checkpointing_off(self._checkpointable), _adapters_off(self.unet, self._adapter_layers):
            yield self.unet

    @contextlib.contextmanager
    def perceptual_encoder(self, dtype: str = "model") -> Iterator[torch.nn.Module]:
        """The frozen U-Net the encoder ``f`` runs on: ``model`` as it is (training precision), or ``fp32``
        with autocast off (a float32 copy of its down path when the weights are in half precision)."""
        if dtype == "model":
            with self.frozen_unet() as unet:
                yield unet
            return
        if dtype != "fp32":
            raise UsageError(f"unknown encoder dtype {dtype!r}; expected 'model' or 'fp32'")
        with torch.autocast(self.device.type, enabled=False), self.frozen_unet() as unet:
            # the frozen U-Net's precision decides (a full fine-tune's reference is half while the policy is fp32)
            yield unet if unet.dtype == torch.float32 else self._float32_encoder()

    def _float32_encoder(self) -> torch.nn.Module:
        """A float32 copy of the frozen U-Net without its up path (made once; the frozen weights never change)."""
        if self._fp32_encoder is None:
            source = self.reference_unet if self.reference_unet is not None else self.unet
            if hasattr(source, "up_blocks"):  # a U-Net: the encoder is its down path
                up_blocks, source.up_blocks = source.up_blocks, torch.nn.ModuleList()
                try:
                    copy_ = copy.deepcopy(source)
                finally:
                    source.up_blocks = up_blocks
                copy_.conv_norm_out = copy_.conv_act = copy_.conv_out = None
            else:  # a transformer: the encoder is its first blocks (all are kept: the depth is an option)
                copy_ = copy.deepcopy(source)
            from peft.tuners.tuners_utils import BaseTunerLayer

            for layer in copy_.modules():
                if isinstance(layer, BaseTunerLayer):
                    layer._disable_adapters = True  # the copy is the pretrained model: no LoRA
            self._fp32_encoder = copy_.to(dtype=torch.float32).requires_grad_(False).eval()
        return self._fp32_encoder

    # -- prediction ------------------------------------------------------------------------------
    def predict_epsilon(self, unet, x_t: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        """``eps_theta(x_t, t, c)`` in the process's target space: a v- or x0-prediction model's output is
        converted to epsilon; a flow model's is its velocity (its "noise space" is velocity space)."""
        timestep = self.schedule.model_timestep(t, x_t)
        out = self.backbone.forward(unet, x_t.to(self.unet.dtype), timestep, condition)
        return self.schedule.to_target(out, x_t, t)

    def resolved_reference_pass(self) -> str:
        """:attr:`reference_pass` with ``auto`` decided by the precision the denoiser computes in now."""
        if self.reference_pass != "auto":
            return self.reference_pass
        if self.lora is None:
            return "separate"
        return "difference" if torch.bfloat16 in compute_dtypes(self.unet.dtype, self.device) else "separate"

    def predict_with_reference(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(eps_theta, eps_ref)``: the policy's prediction (with graph) and the frozen reference's (without), by
        :attr:`reference_pass`. With ``difference`` both are float32: ``eps_ref`` is bit-identical to a separate
        reference pass and ``eps_theta - eps_ref`` keeps half precision's relative accuracy."""
        if self.resolved_reference_pass() == "separate":
            eps_theta = self.predict_epsilon(self.policy, x_t, t, condition)
            with torch.no_grad(), self.frozen_unet() as reference:
                return eps_theta, self.predict_epsilon(reference, x_t, t, condition)
        if any(getattr(layer, "merged", False) for layer in self._adapter_layers):
            raise UsageError("the difference pass needs unmerged LoRA adapters (merged ones are in the base weights, "
                             "which are the reference's); unmerge them or use reference_pass 'separate'")
        timestep = self.schedule.model_timestep(t, x_t)
        out_ref, out_diff = difference_forward(self.backbone.forward, self.policy, x_t.to(self.unet.dtype), timestep,
                                               condition)
        eps_ref = self.schedule.to_target(out_ref.float(), x_t, t)
        # the target map is affine in the output: applied to the policy's value in float32, the difference survives
        eps_theta = self.schedule.to_target(out_ref.float() + out_diff.float(), x_t, t)
        return eps_theta, eps_ref.detach()

    # -- encoding raw inputs ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings (and SDXL's, SD3's or FLUX's pooled embeddings) with the pipeline's own ``encode_prompt``."""
        return self.encode_text(prompts)[:2]

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(embeds, pooled, attention_mask)``, what a batch's ``prompt_embeds``, ``pooled_prompt_embeds`` and
        ``prompt_attention_mask`` hold: pooled for SDXL, SD3 and FLUX, the T5 padding mask for PixArt (the
        only model that attends to masked text), None where a model has none."""
        if any(not isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be strings")
        return encode_text(self.kind, self.pipeline, prompts, self.device)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None,
                      sample: bool = True) -> torch.Tensor:
        """VAE latents of images in [-1, 1], scaled by ``scaling_factor``: a posterior sample (as
        Diffusion-DPO) or, with ``sample=False``, its mean (what the latent cache stores)."""
        vae = self.pipeline.vae
        if vae is None:  # a pixel-space model: the images are the diffusion variable
            channels = self.unet.config.in_channels
            if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
                raise ValueError(f"pixel values must be (N, {channels}, H, W); got {tuple(pixel_values.shape)}")
            return pixel_values.to(device=self.device, dtype=torch.float32)
        if pixel_values.ndim != 4 or pixel_values.shape[1] != vae.config.in_channels:
            raise ValueError(
                f"pixel values must be (N, {vae.config.in_channels}, H, W); got {tuple(pixel_values.shape)}"
            )
        posterior = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def default_time_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """SDXL micro-conditioning for uncropped images of the latents' size: ``(h, w, 0, 0, h, w)``."""
        h, w = (s * self.pipeline.vae_scale_factor for s in latents.shape[-2:])
        row = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32, device=latents.device)
        return row.expand(latents.shape[0], 6).clone()

    def encode_batch(self, batch: PreferenceBatch, generator: torch.Generator | None = None) -> EncodedPairs:
        """Check a batch and encode whatever it carries raw (pixels, prompt strings)."""
        latents = {}
        for side in ("w", "l"):
            lat, pix = getattr(batch, f"latents_{side}"), getattr(batch, f"pixel_values_{side}")
            if lat is None and pix is None:
                raise ValueError(f"the batch has neither latents_{side} nor pixel_values_{side}")
            latents[side] = lat if lat is not None else self.encode_images(pix, generator)
        lw, ll = latents["w"], latents["l"]
        channels = self.backbone.latent_channels(self.unet)
        for side, lat in latents.items():
            if lat.ndim != 4 or lat.shape[1] != channels:
                raise ValueError(f"latents_{side} must be (B, {channels}, h, w) for this {self.kind} model; "
                                 f"got {tuple(lat.shape)}")
        if lw.shape != ll.shape:
            raise ValueError(f"winner latents {tuple(lw.shape)} and loser latents {tuple(ll.shape)} differ in shape")

        embeds, pooled, mask = batch.prompt_embeds, batch.pooled_prompt_embeds, batch.prompt_attention_mask
        if embeds is None:
            if batch.prompts is None:
                raise ValueError("the batch has neither prompt_embeds nor prompts")
            embeds, pooled, mask = self.encode_text(list(batch.prompts))
        if self.backbone.needs_mask and (mask is None or mask.shape != embeds.shape[:2]):
            raise ValueError(f"a {self.kind} model attends to masked T5 tokens: prompt_embeds {tuple(embeds.shape)} need a "
                             f"prompt_attention_mask of shape {tuple(embeds.shape[:2])} (a latent cache built by this "
                             "ncppo stores it: rebuild an older cache, or give the mask or the prompts)")
        if embeds.ndim != 3 or embeds.shape[0] != lw.shape[0]:
            raise ValueError(f"prompt_embeds must be (B={lw.shape[0]}, L, D); got {tuple(embeds.shape)}")
        cross_dim = self.unet.config[self.backbone.text_width_key]
        if embeds.shape[-1] != cross_dim:
            raise ValueError(f"prompt_embeds have width {embeds.shape[-1]}, this {self.kind} model expects {cross_dim}")
        if self.backbone.needs_pooled and pooled is None:
            raise ValueError(f"an {self.kind.upper()}-class model needs pooled_prompt_embeds (or prompts to encode)")
        if self.kind == "sdxl":
            cond_w = Condition(embeds, pooled, _time_ids(batch.time_ids_w, self.default_time_ids(lw), "w"))
            cond_l = Condition(embeds, pooled, _time_ids(batch.time_ids_l, self.default_time_ids(ll), "l"))
        elif self.backbone.needs_pooled:
            guidance = None if self.guidance is None else torch.full((lw.shape[0],), self.guidance)
            cond_w = cond_l = Condition(embeds, pooled, guidance=guidance)
        elif self.backbone.needs_mask:
            cond_w = cond_l = Condition(embeds, attention_mask=mask)
        else:
            cond_w = cond_l = Condition(embeds)
        device = self.device
        # The diffusion variable stays float32 whatever the VAE's precision: x_{t-1} differs from the target by
        # about 1e-4 of its size, below the half-precision grid (METHOD.md, "Scale and precision").
        return EncodedPairs(
            lw.to(device, torch.float32), ll.to(device, torch.float32), cond_w.map(lambda v: v.to(device)), cond_l.map(lambda v: v.to(device)),
            list(batch.ids), batch.is_tie,
        )

    # -- saving ----------------------------------------------------------------------------------
    def save_lora(self, out_dir) -> None:
        """Save the U-Net LoRA in diffusers' format: ``pipe.load_lora_weights(out_dir)`` loads it."""
        with atomic_directory(out_dir) as tmp:
            self.write_lora(tmp)

    def write_lora(self, folder) -> None:
        """Write ``pytorch_lora_weights.safetensors`` (diffusers' format) into the existing ``folder`` as it is
        (no scratch folder: for a folder that is itself being written atomically, e.g. a checkpoint)."""
        if self.lora is None:
            raise ValueError("this model is fully fine-tuned; use save_unet()")
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(self.unet)
        if self.backbone.attribute == "unet":
            layers = convert_state_dict_to_diffusers(layers)
            # diffusers converts only the attention projections to .lora.down/.lora.up and leaves other targets as
            # lora_A/lora_B; its loader decides the format from the first key alone, so a mixed file loses a part
            # (e.g. to_q + proj_in: the to_q adapters). One naming for every key.
            layers = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in layers.items()}
        # a transformer's loader reads peft's own lora_A/lora_B keys (as diffusers' SD3 LoRA scripts save them)
        metadata = self.unet.peft_config["default"].to_dict()
        if not hasattr(type(self.pipeline), "save_lora_weights"):  # PixArt: diffusers has no LoRA loader for it
            from ncppo.models.transformers_backbone import write_peft_lora

            write_peft_lora(folder, layers, metadata)
            return
        type(self.pipeline).save_lora_weights(folder, **self.backbone.lora_save_kwargs(layers, metadata))

    def save_unet(self, out_dir, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Save the fully fine-tuned U-Net in diffusers' format (``UNet2DConditionModel.from_pretrained``).
        ``state_dict``: its whole weights, gathered from a sharded U-Net (FSDP), whose own tensors are shards."""
        with atomic_directory(out_dir) as tmp:
            if state_dict is None:
                self.unet.save_pretrained(tmp, safe_serialization=True)
                return
            # FSDP2 changed the module's class to FSDP<Name> (diffusers would record that name): an empty
            # model of the real class on the meta device takes the gathered tensors without copying them
            cls = next(c for c in type(self.unet).__mro__ if c.__module__.startswith("diffusers."))
            with torch.device("meta"):
                plain = cls.from_config(self.unet.config)
            plain.load_state_dict(state_dict, assign=True)
            plain.save_pretrained(tmp, safe_serialization=True)


def _time_ids(given: torch.Tensor | None, default: torch.Tensor, side: str) -> torch.Tensor:
    if given is None:
        return default
    if given.shape != default.shape:
        raise ValueError(f"time_ids_{side} must be (B, 6); got {tuple(given.shape)}")
    return given.to(default)


@contextlib.contextmanager
def _adapters_off(unet, adapter_layers):
    if any(getattr(layer, "merged", False) for layer in adapter_layers):
        unet.disable_adapters()  # merged weights must be unmerged: peft's own path does that
        try:
            yield
        finally:
            unet.enable_adapters()
        return
    # peft's disable/enable also resets requires_grad on every LoRA tensor (~3 ms a toggle on a small
    # U-Net, twice a step); the LoRA forward reads only this flag.
    for layer in adapter_layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in adapter_layers:
            layer._disable_adapters = False


@contextlib.contextmanager
def _gradient_checkpointing_off(checkpointable: list[torch.nn.Module]):
    switched = [m for m in checkpointable if m.gradient_checkpointing]
    for m in switched:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in switched:
            m.gradient_checkpointing = True
