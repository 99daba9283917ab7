"""Simulated annotators and the toy world's Pick-a-Pic-like preference dataset.

For each prompt, a pool of images is sampled from the base model by two "generators" (two guidance
scales, as Pick-a-Pic mixes models). Several annotators each compare different pairs of the pool:
a reward gap below ``tie_margin`` is a tie; otherwise the vote follows a Bradley-Terry choice,
``P(a beats b) = sigmoid((r_a - r_b) / temperature)``, and a careless annotator (``careless_rate``)
flips a coin instead. Images recur across a prompt's comparisons, so the data has contradictions and
absolute winners like the real one. Rows are written in the Pick-a-Pic v2 schema.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ncppo.data.pickapic import Comparison, comparisons_table, image_bytes, write_parquet_shards
from ncppo.errors import UsageError
from ncppo.evaluation.stats import bradley_terry_probability


@dataclass(frozen=True)
class AnnotatorConfig:
    """The simulated annotators.

    Parameters:
        comparisons_per_prompt: labelled pairs per caption (images recur across them).
        annotators: the pool of users; each comparison is made by one of them.
        temperature: the Bradley-Terry scale on the oracle's [0, 1] reward.
        tie_margin: a smaller reward gap is judged a tie.
        careless_rate: share of votes that are a coin flip.
        seed: the votes' seed.
    """

    comparisons_per_prompt: int = 12
    annotators: int = 40  # the pool of users; each comparison is made by one of them
    temperature: float = 0.05  # Bradley-Terry scale on the oracle's [0, 1] reward
    tie_margin: float = 0.01  # a smaller reward gap is judged a tie
    careless_rate: float = 0.1  # votes that are a coin flip
    seed: int = 0


@dataclass(frozen=True)
class PooledImage:
    """One sampled image of a caption's pool: its uid, oracle reward and the generator that made it."""

    uid: str
    reward: float
    generator: str  # which model/setting made it (Pick-a-Pic's model_0/model_1)


def simulate_votes(pools: dict[str, Sequence[PooledImage]], cfg: AnnotatorConfig) -> list[Comparison]:
    """Comparisons for every prompt's pool of images (each pool needs at least two images)."""
    rng = np.random.default_rng(cfg.seed)
    rows, clock = [], 0
    for caption, pool in pools.items():
        if len(pool) < 2:
            raise UsageError(f"prompt {caption!r} has {len(pool)} image(s); comparisons need at least 2")
        for _ in range(cfg.comparisons_per_prompt):
            i, j = rng.choice(len(pool), size=2, replace=False)
            a, b = pool[i], pool[j]
            gap = a.reward - b.reward
            if abs(gap) < cfg.tie_margin:
                label = 0.5
            elif rng.random() < cfg.careless_rate:
                label = float(rng.integers(2))
            else:
                label = float(rng.random() < bradley_terry_probability(gap, cfg.temperature))
            clock += int(rng.integers(1, 60))  # seconds between votes: created_at orders them
            rows.append(Comparison(caption, a.uid, b.uid, label, created_at=clock * 10**9,
                                   user_id=int(rng.integers(cfg.annotators)), ranking_id=len(rows),
                                   model_0=a.generator, model_1=b.generator))
    return rows


def build_pools(captions: Sequence[str], generate: Callable[[list[str], int, float], np.ndarray],
                reward: Callable, images_per_prompt: int = 4, guidance_scales: Sequence[float] = (3.0, 1.5),
                seed: int = 0, progress: bool = False, image_format: str = "png", rival=None,
                ) -> tuple[dict[str, list[PooledImage]], dict[str, bytes]]:
    """Sample ``images_per_prompt`` images per caption, split over the generators (guidance scales), and
    score them, then add ``rival.images_per_prompt`` images of the rival model (a
    :class:`ncppo.toy.rival.RivalConfig`; None: none). ``generate(captions, seed, guidance)`` returns uint8
    images ``(n, H, W, 3)``; they are stored as ``image_format`` bytes (``png``: the very pixels the oracle scored)."""
    from tqdm.auto import tqdm

    from ncppo.toy.rival import rival_images

    pools: dict[str, list[PooledImage]] = {c: [] for c in captions}
    images: dict[str, bytes] = {}
    draws = images_per_prompt + (rival.images_per_prompt if rival else 0)
    size = None
    for k in tqdm(range(draws), desc="sample image pools", unit="draw", disable=not progress):
        if k < images_per_prompt:
            guidance = guidance_scales[k % len(guidance_scales)]
            batch, generator = generate(list(captions), seed * 1000 + k, guidance), f"base-cfg{guidance:g}"
            size = batch.shape[1]
        else:  # the rival draws at the base model's size
            batch, generator = rival_images(list(captions), seed * 1000 + k, size or 32, rival), "rival"
        scores = reward(batch, list(captions))
        for p, (caption, image, score) in enumerate(zip(captions, batch, scores)):
            uid = f"img-{seed}-{p}-{k}"
            images[uid] = image_bytes(image, image_format)
            pools[caption].append(PooledImage(uid, float(score), generator))
    return pools, images


def pipeline_generator(pipe, num_inference_steps: int = 20, batch_size: int = 56):
    """Adapt a text-to-image pipeline to ``build_pools``: one fixed seed per (caption, draw). Batches of
    ~56 run faster on CPU than one batch of every caption (cache-sized activations)."""
    from ncppo.evaluation.generation import render_images

    def generate(captions: list[str], seed: int, guidance: float) -> np.ndarray:
        out = []
        for start in range(0, len(captions), batch_size):
            chunk = captions[start:start + batch_size]
            seeds = [seed * 100_003 + start + i for i in range(len(chunk))]
            out.append(render_images(pipe, chunk, seeds, num_inference_steps, guidance))
        return np.concatenate(out)

    return generate


def write_preference_dataset(pools, images, out_dir: str | os.PathLike, cfg: AnnotatorConfig,
                             rows_per_shard: int = 2000) -> Path:
    """Vote and write the comparisons with their images as Pick-a-Pic v2 parquet shards (atomically)."""
    comparisons = simulate_votes(pools, cfg)
    return write_parquet_shards(comparisons_table(comparisons, images), out_dir, rows_per_shard=rows_per_shard)
