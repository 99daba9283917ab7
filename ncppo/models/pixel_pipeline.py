"""A text-to-image pipeline that denoises pixels directly (no VAE): the toy world's model class.

:class:`PixelTextToImagePipeline` has SD1.5's parts minus the VAE (a ``UNet2DConditionModel`` on RGB, a CLIP
text encoder and tokenizer, any diffusers scheduler) and SD1.5's interfaces: ``encode_prompt``, ``__call__``
with classifier-free guidance, and diffusers' LoRA save/load (``StableDiffusionLoraLoaderMixin``), so the
project's loaders, trainer and evaluation treat it like SD1.5. Its transformer twin is
:class:`ncppo.models.pixel_dit_pipeline.PixelDiTPipeline`. Saved with ``save_pretrained``; loaded with
``ncppo.models.loading.load_pipeline`` (diffusers' generic loader does not know the class) or by diffusers with this
file as ``custom_pipeline``.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils.torch_utils import randn_tensor


class PixelSampling:
    """What both pixel pipelines share: the text encoder, classifier-free guidance and the sampling loop (a mixin,
    not a pipeline: diffusers loads a pipeline file holding exactly one ``DiffusionPipeline``)."""

    vae = None  # pixel space: images are the diffusion variable
    vae_scale_factor = 1

    @property
    def denoiser(self):
        raise NotImplementedError

    def denoise(self, sample: torch.Tensor, t, embeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _embed(self, prompts: list[str], device) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0]

    def encode_prompt(self, prompt, device, num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = False,
                      negative_prompt=None):
        """``(prompt_embeds, negative_prompt_embeds)``, as ``StableDiffusionPipeline.encode_prompt``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds = self._embed(prompts, device).repeat_interleave(num_images_per_prompt, dim=0)
        negative = None
        if do_classifier_free_guidance:
            negatives = negative_prompt if negative_prompt is not None else [""] * len(prompts)
            negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
            negative = self._embed(negatives, device).repeat_interleave(num_images_per_prompt, dim=0)
        return embeds, negative

    @torch.no_grad()
    def __call__(self, prompt, height: int | None = None, width: int | None = None, num_inference_steps: int = 20,
                 guidance_scale: float = 3.0, negative_prompt=None, num_images_per_prompt: int = 1, generator=None,
                 output_type: str = "pil", return_dict: bool = True):
        size = self.denoiser.config.sample_size
        height, width = height or size, width or size
        device = self._execution_device
        guided = guidance_scale > 1.0
        embeds, negative = self.encode_prompt(prompt, device, num_images_per_prompt, guided, negative_prompt)
        if guided:
            embeds = torch.cat([negative, embeds])
        n = embeds.shape[0] // (2 if guided else 1)
        sample = randn_tensor((n, self.denoiser.config.in_channels, height, width), generator=generator,
                              device=device, dtype=self.denoiser.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        sample = sample * self.scheduler.init_noise_sigma
        step_generator = generator if isinstance(generator, torch.Generator) else None
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(torch.cat([sample] * 2) if guided else sample, t)
            out = self.denoise(model_input, t, embeds)
            if guided:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            sample = self.scheduler.step(out, t, sample, generator=step_generator).prev_sample
        images = (sample.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        elif output_type == "pt":
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


class PixelTextToImagePipeline(PixelSampling, DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @property
    def denoiser(self):
        return self.unet

    def denoise(self, sample, t, embeds):
        return self.unet(sample, t, encoder_hidden_states=embeds).sample

