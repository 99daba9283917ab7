"""A latent and text-embedding cache for preference pairs: encode once, train many times.

Layout of a cache folder::

    config.json                 what it was built from (model, resolution, dtype, pair fingerprint)
    shard-00000.safetensors     latents_w, latents_l, prompt_embeds, [pooled_prompt_embeds],
    shard-00001.safetensors     time_ids_w, time_ids_l, pair_index; metadata: captions, skipped pairs
    index.json                  written last: the cache is complete only when it exists

Each shard is written to a temporary name and renamed, so a killed run leaves only whole shards, and a
rerun skips them (resume). Shards are spread over processes (``accelerate launch``): shard ``k`` goes to
rank ``k % world_size``. Latents are the VAE posterior mean (deterministic), scaled by
``scaling_factor``; SDXL ``time_ids`` carry each image's real original size and crop.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ncppo.batch import PreferenceBatch
from ncppo.data.schema import DataError
from ncppo.io import atomic_write_text

CACHE_FORMAT = "ncppo-latent-cache/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _fingerprint(pairs) -> str:
    digest = hashlib.sha256()
    for column in (pairs.meta.caption, pairs.meta.uid_w, pairs.meta.uid_l):
        for value in column.to_pylist():
            digest.update(value.encode() + b"\0")
    return digest.hexdigest()[:16]


def _shard_path(out_dir: Path, k: int) -> Path:
    return out_dir / f"shard-{k:05d}.safetensors"


def build_cache(model, pairs, out_dir: str | os.PathLike, *, resolution: int, batch_size: int = 8,
                pairs_per_shard: int = 256, dtype: str = "float32", model_name: str = "", progress: bool = True,
                state=None) -> dict | None:
    """Encode every pair of ``pairs`` with ``model`` into ``out_dir``; returns the index (on the main process)."""
    from accelerate import PartialState
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"unknown cache dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    state = state or PartialState()
    out_dir = Path(out_dir)
    config = {"format": CACHE_FORMAT, "model": model_name, "model_kind": model.kind, "resolution": resolution,
              "dtype": dtype, "pairs": len(pairs), "pairs_per_shard": pairs_per_shard,
              "fingerprint": _fingerprint(pairs), "vae_scale_factor": model.pipeline.vae_scale_factor}
    config_path = out_dir / "config.json"
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if config_path.is_file():
            previous = json.loads(config_path.read_text())
            changed = {k: (previous.get(k), v) for k, v in config.items() if previous.get(k) != v}
            if changed:
                raise DataError(f"{out_dir} holds a cache built with other settings {changed}; "
                                "use a new output folder")
        else:
            atomic_write_text(config_path, json.dumps(config, indent=2))
    state.wait_for_everyone()

    num_shards = max(1, -(-len(pairs) // pairs_per_shard))
    mine = [k for k in range(num_shards) if k % state.num_processes == state.process_index]
    todo = [k for k in mine if not _shard_path(out_dir, k).is_file()]
    for k in tqdm(todo, desc=f"cache (rank {state.process_index})", unit="shard", disable=not progress):
        indices = np.arange(k * pairs_per_shard, min((k + 1) * pairs_per_shard, len(pairs)))
        parts, skipped_before = [], pairs.skips.total
        for start in range(0, len(indices), batch_size):
            batch = pairs.collate(indices[start : start + batch_size], resolution)
            if batch is not None:
                parts.append(_encode(model, batch, DTYPES[dtype]))
        tensors = {key: torch.cat([p[key] for p in parts]) for key in parts[0]} if parts else {}
        skipped = pairs.skips.total - skipped_before
        metadata = {"format": CACHE_FORMAT, "skipped": str(skipped),
                    "captions": json.dumps([pairs.meta.caption[int(i)].as_py() for i in tensors.get(
                        "pair_index", torch.zeros(0, dtype=torch.long)).tolist()])}
        tmp = out_dir / f".tmp-shard-{k:05d}-{os.getpid()}.safetensors"
        save_file({k2: v.contiguous() for k2, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, _shard_path(out_dir, k))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return _write_index(out_dir, num_shards, config)


@torch.no_grad()
def _encode(model, batch: PreferenceBatch, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    embeds, pooled = model.encode_prompts(batch.prompts)
    out = {
        "latents_w": model.encode_images(batch.pixel_values_w, sample=False),
        "latents_l": model.encode_images(batch.pixel_values_l, sample=False),
        "prompt_embeds": embeds,
        "time_ids_w": batch.time_ids_w,
        "time_ids_l": batch.time_ids_l,
    }
    if pooled is not None:
        out["pooled_prompt_embeds"] = pooled
    out = {k: v.detach().to("cpu", dtype) for k, v in out.items()}
    out["pair_index"] = torch.tensor(batch.ids, dtype=torch.long)
    return out


def _write_index(out_dir: Path, num_shards: int, config: dict) -> dict:
    from safetensors import safe_open

    shards, total, skipped = [], 0, 0
    for k in range(num_shards):
        path = _shard_path(out_dir, k)
        with safe_open(str(path), framework="pt") as f:
            n = f.get_slice("pair_index").get_shape()[0] if "pair_index" in f.keys() else 0  # noqa: SIM118 (safe_open has no __contains__)
            skipped += int(f.metadata().get("skipped", 0))
        shards.append({"file": path.name, "pairs": n})
        total += n
    index = {**config, "num_shards": num_shards, "cached_pairs": total, "skipped_pairs": skipped, "shards": shards}
    atomic_write_text(out_dir / "index.json", json.dumps(index, indent=2))
    return index


class LatentCache:
    """Batches from a finished cache, in the same :class:`PreferenceBatch` form as raw pairs.

    Shuffling is shard-local: shard order is shuffled, then pairs within each shard, so only one
    shard (memory-mapped) is read at a time.
    """

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32):
        self.path = Path(path)
        index_path = self.path / "index.json"
        if not index_path.is_file():
            raise DataError(f"{self.path}: no index.json, so the cache is incomplete; run `ncppo data cache` "
                            "again with the same arguments to finish it")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != CACHE_FORMAT:
            raise DataError(f"{self.path}: unknown cache format {self.index.get('format')!r}")
        self.dtype = dtype

    def __len__(self) -> int:
        return int(self.index["cached_pairs"])

    def load_shard(self, k: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        tensors = load_file(str(self.path / self.index["shards"][k]["file"]))
        return {key: v if key == "pair_index" else v.to(self.dtype) for key, v in tensors.items()}

    def plan(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> list:
        """The epoch's batches as ``(shard, rows)`` without loading anything (resume skips cheaply)."""
        rng = np.random.default_rng(seed)
        shards = self.index["shards"]
        shard_order = rng.permutation(len(shards)) if shuffle else range(len(shards))
        plan = []
        for k in shard_order:
            n = shards[k]["pairs"]
            order = rng.permutation(n) if shuffle else np.arange(n)
            for start in range(0, n, batch_size):
                rows = order[start : start + batch_size]
                if drop_last and len(rows) < batch_size:
                    break
                plan.append((int(k), rows))
        return plan

    def make_batch(self, shard: int, rows) -> PreferenceBatch:
        if getattr(self, "_loaded", (None,))[0] != shard:
            self._loaded = (shard, self.load_shard(shard))  # one shard in memory at a time
        t, sel = self._loaded[1], torch.as_tensor(np.asarray(rows), dtype=torch.long)
        return PreferenceBatch(
            latents_w=t["latents_w"][sel], latents_l=t["latents_l"][sel], prompt_embeds=t["prompt_embeds"][sel],
            pooled_prompt_embeds=t["pooled_prompt_embeds"][sel] if "pooled_prompt_embeds" in t else None,
            time_ids_w=t["time_ids_w"][sel], time_ids_l=t["time_ids_l"][sel], ids=t["pair_index"][sel].tolist(),
        )

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False) -> Iterator[PreferenceBatch]:
        for shard, rows in self.plan(batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last):
            yield self.make_batch(shard, rows)
