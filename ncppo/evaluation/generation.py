"""Paired generation: every model draws image ``k`` of prompt ``p`` from the same seed.

The seed of (prompt index, image index) depends only on the spec, never on the model, the batch size
or how many images were made before, so two models' images of one (prompt, seed) differ only by the
models: the comparisons built on them are paired.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from tqdm.auto import tqdm

from ncppo.models.loading import render_images  # the one rendering rule; re-exported here for callers


@dataclass(frozen=True)
class GenerationSpec:
    """What to sample, identically for every model; the defaults are also ``ncppo generate``'s and ``ncppo curve``'s.

    Parameters:
        prompts: the prompts, in order.
        images_per_prompt: images per prompt.
        seed: the seed every per-(prompt, image) seed derives from (:meth:`seed_for`).
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance.
        batch_size: images per pipeline call (does not change the images beyond float summation order).
        height: image height (``None``: the model's default); likewise ``width``.
        prompt_ids: a stable id per prompt (default: its index); seeds follow it, so a subset keeps its images.
    """

    prompts: tuple[str, ...]
    images_per_prompt: int = 1
    seed: int = 0
    num_inference_steps: int = 20
    guidance_scale: float = 3.0
    batch_size: int = 64
    height: int | None = None
    width: int | None = None
    prompt_ids: tuple[int, ...] | None = None

    def seed_for(self, prompt_index: int, image_index: int) -> int:
        pid = self.prompt_ids[prompt_index] if self.prompt_ids is not None else prompt_index
        return self.seed * 1_000_003 + pid * 1_009 + image_index

    def subset(self, indices) -> GenerationSpec:
        """The spec of some of the prompts, with the very seeds (hence images) they have in this spec."""
        ids = self.prompt_ids or tuple(range(len(self.prompts)))
        return replace(self, prompts=tuple(self.prompts[i] for i in indices), prompt_ids=tuple(ids[i] for i in indices))

    def items(self) -> list[tuple[int, int]]:
        """(prompt index, image index) of every image, prompt-major."""
        return [(p, k) for p in range(len(self.prompts)) for k in range(self.images_per_prompt)]


@dataclass
class Samples:
    """Generated images with what identifies them: ``prompt_ids[i]`` (the spec's stable prompt id) and
    ``seeds[i]`` name image ``i``; two models' samples of one spec pair up index by index."""

    images: np.ndarray  # (n, H, W, 3) uint8
    prompts: list[str]
    prompt_ids: np.ndarray
    seeds: np.ndarray



def render_batch(pipe, spec: GenerationSpec, chunk: list[tuple[int, int]]) -> np.ndarray:
    """uint8 images ``(n, H, W, 3)`` of the (prompt index, image index) pairs in ``chunk``, each from its own seed."""
    return render_images(pipe, [spec.prompts[p] for p, _ in chunk], [spec.seed_for(p, k) for p, k in chunk],
                         spec.num_inference_steps, spec.guidance_scale, spec.height, spec.width)


def generate_samples(pipe, spec: GenerationSpec, progress: bool = True, desc: str = "generate") -> Samples:
    """Every image of ``spec`` from ``pipe`` (a diffusers text-to-image pipeline), in batches."""
    items = spec.items()
    out = []
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # one bar over batches, not one per denoising loop
    for start in tqdm(range(0, len(items), spec.batch_size), desc=desc, disable=not progress, leave=False):
        out.append(render_batch(pipe, spec, items[start:start + spec.batch_size]))
    ids = spec.prompt_ids or tuple(range(len(spec.prompts)))
    return Samples(np.concatenate(out), [spec.prompts[p] for p, _ in items], np.array([ids[p] for p, _ in items]),
                   np.array([spec.seed_for(p, k) for p, k in items], dtype=np.int64))
