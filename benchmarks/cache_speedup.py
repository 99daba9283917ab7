"""Seconds per training step from the latent cache vs from raw images (decode, VAE, text encoders).

A tiny SD1.5-class pipeline with an SD-shaped VAE (four levels, downsampling by 8) and a tiny U-Net;
a Pick-a-Pic-format parquet dataset of JPEG pairs at each image size; the cache built once from it.
Raw and cached steps (NCP-DPO: forward, backward, AdamW) alternate in one run; medians and the median
of per-repetition ratios are reported.

    python benchmarks/cache_speedup.py     # writes benchmarks/results/cache_speedup.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ncppo.data.cache import LatentCache, build_cache  # noqa: E402
from ncppo.data.pairs import PreferencePairs  # noqa: E402
from ncppo.data.pickapic import Comparison, comparisons_table, jpeg_bytes, write_parquet_shards  # noqa: E402
from ncppo.io import atomic_write_text  # noqa: E402
from ncppo.models.preference_model import LoraSettings, PreferenceModel  # noqa: E402
from ncppo.models.tiny import build_tiny_pipeline  # noqa: E402
from ncppo.objectives import make_objective  # noqa: E402
from ncppo.step import training_step  # noqa: E402

VAE = (32, 64, 128, 128)


def make_dataset(path: Path, n_pairs: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    images, comps = {}, []
    yy, xx = np.mgrid[:size, :size] / size
    for k in range(n_pairs):
        for uid in (f"w{k}", f"l{k}"):
            base = rng.integers(0, 255, size=3)
            img = base + 60 * np.stack([np.sin(6 * xx + k), np.cos(5 * yy), xx * yy], -1) + rng.normal(0, 8, (size, size, 3))
            images[uid] = jpeg_bytes(np.clip(img, 0, 255))
        comps.append(Comparison(f"a colourful pattern number {k}", f"w{k}", f"l{k}", 1.0, created_at=k))
    write_parquet_shards(comparisons_table(comps, images), path, rows_per_shard=n_pairs)


def bench_size(size: int, reps: int, batch_pairs: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_dataset(tmp / "data", batch_pairs * (reps + 2), size, seed)
        model = PreferenceModel(build_tiny_pipeline("sd15", image_size=size, vae_block_out_channels=VAE, seed=seed),
                                lora=LoraSettings(rank=8))
        pairs = PreferencePairs(tmp / "data")
        start = time.perf_counter()
        build_cache(model, pairs, tmp / "cache", resolution=size, batch_size=batch_pairs, progress=False)
        cache_seconds = time.perf_counter() - start
        cache = LatentCache(tmp / "cache")
        cached_batches = itertools.cycle(list(cache.batches(batch_pairs, shuffle=False)))
        raw_chunks = itertools.cycle([list(range(i, i + batch_pairs)) for i in range(0, len(pairs), batch_pairs)])
        objective = make_objective("ncp-dpo")
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
        generator = torch.Generator().manual_seed(seed)
        model.unet.train()

        def step(batch_fn):
            t0 = time.perf_counter()
            batch = batch_fn()
            out = training_step(model, objective, batch, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            return time.perf_counter() - t0

        raw = lambda: pairs.collate(next(raw_chunks), size)  # noqa: E731  decode + resize; VAE/text in the step
        cached = lambda: next(cached_batches)  # noqa: E731
        for _ in range(2):
            step(raw)
            step(cached)
        raw_t, cached_t = [], []
        for _ in range(reps):
            raw_t.append(step(raw))
            cached_t.append(step(cached))
        latent = size // 2 ** (len(VAE) - 1)
        return {
            "image_size": size, "latent_size": latent, "batch_pairs": batch_pairs, "reps": reps,
            "vae_block_out_channels": list(VAE), "unet_block_out_channels": [32, 64],
            "cache_build_seconds": cache_seconds, "cached_pairs": len(cache),
            "median_seconds_raw": statistics.median(raw_t), "median_seconds_cached": statistics.median(cached_t),
            "ratio_cached_to_raw": statistics.median(cached_t) / statistics.median(raw_t),
            "median_paired_ratio": statistics.median(c / r for c, r in zip(cached_t, raw_t)),
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--batch-pairs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cache_speedup.json"))
    args = parser.parse_args(argv)
    results = []
    for size in args.sizes:
        row = bench_size(size, args.reps, args.batch_pairs, args.seed)
        results.append(row)
        print(f"{size}px: raw {row['median_seconds_raw'] * 1e3:.0f} ms/step, cached {row['median_seconds_cached'] * 1e3:.0f}"
              f" ms/step, cached/raw {row['median_paired_ratio']:.2f}x (cache built in {row['cache_build_seconds']:.1f} s)",
              flush=True)
    import diffusers

    report = {
        "benchmark": "cache_speedup",
        "command": "python benchmarks/cache_speedup.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__},
        "objective": "ncp-dpo", "target_ratio": 0.6, "results": results,
    }
    out = Path(args.out)
    atomic_write_text(out, json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
