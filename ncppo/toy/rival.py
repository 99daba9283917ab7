"""A rival "model" in the toy world's image pools: Pick-a-Pic's pools mix models of different strengths.

The base model's pools alone give DPO only its own lucky draws to learn from (two guidance scales of one
model): on the toy world that moved validation reward by at most +0.0024 (``benchmarks/toy_regime.py``).
The rival draws the scene with the world's renderer and flaws of its own: jittered colours, pixel noise and,
at ``wrong_shape_rate``, another shape. So it is better than the base at crisp shapes and worse at some
captions, and the annotators' winners carry what the base lacks. Seeded per (caption, draw).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from ncppo.toy.world import COLOURS, SHAPES, Scene, random_placement, shape_mask


@dataclass(frozen=True)
class RivalConfig:
    """The rival's share of the pools and its flaws.

    Parameters:
        images_per_prompt: rival images per caption, added to the base model's (0: no rival).
        wrong_shape_rate: share of its images that draw another shape than the caption's.
        colour_jitter: standard deviation of the per-channel RGB offset of object and background.
        max_noise: pixel noise of each image, uniform in [0, max_noise] (a fraction of 255).
    """

    images_per_prompt: int = 0
    wrong_shape_rate: float = 0.3
    colour_jitter: float = 10.0
    max_noise: float = 0.06


def rival_image(scene: Scene, size: int, cfg: RivalConfig, rng: np.random.Generator) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 image of ``scene`` as the rival draws it."""
    shape = scene.shape
    if rng.random() < cfg.wrong_shape_rate:
        shape = str(rng.choice([s for s in SHAPES if s != scene.shape]))
    centre, radius = random_placement(size, rng)
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = np.array(COLOURS[scene.background], np.float32) + rng.normal(0.0, cfg.colour_jitter, 3)
    image[shape_mask(shape, size, centre, radius)] = (np.array(COLOURS[scene.object_colour], np.float32)
                                                       + rng.normal(0.0, cfg.colour_jitter, 3))
    image += rng.normal(0.0, rng.uniform(0.0, cfg.max_noise) * 255.0, size=image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def rival_images(captions: list[str], seed: int, size: int, cfg: RivalConfig) -> np.ndarray:
    """The rival's images for ``captions`` (one each), ``(n, size, size, 3)`` uint8; each (draw ``seed``,
    caption) has its own generator, so a caption's pool does not depend on the other captions."""
    return np.stack([rival_image(Scene.parse(c), size, cfg, np.random.default_rng([seed, zlib.crc32(c.encode())]))
                     for c in captions])
