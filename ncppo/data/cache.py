"""A latent and text-embedding cache for preference pairs: encode once, train many times.

Layout of a cache folder::

    config.json                 what it was built from (model, resolution, dtype, pair fingerprint)
    shard-00000.safetensors     latents_w, latents_l, prompt_embeds, [pooled_prompt_embeds], [prompt_attention_mask],
    shard-00001.safetensors     time_ids_w, time_ids_l, pair_index; metadata: captions, skipped pairs
    shard-00000.check.json      the shard's size and blake2b digest (and the digests of the images whose
                                uid first occurs in it, so a resumed build decides uid conflicts alike)
    index.json                  written last: the cache is complete only when it exists; it carries
                                every shard's size and digest

Each shard is written to a temporary name and renamed, so a killed run leaves only whole shards, and a
rerun skips them (resume). A rerun also checks the finished shards (size and safetensors header always,
the digest with ``verify=True`` / ``--verify``) and rebuilds damaged ones. Readers check sizes when the
cache is opened and each shard's digest when it is loaded. Shards are spread over processes
(``accelerate launch``): shard ``k`` goes to rank ``k % world_size``. Latents are the VAE posterior mean
(deterministic), scaled by ``scaling_factor``; SDXL ``time_ids`` carry each image's real original size and crop;
PixArt's ``prompt_attention_mask`` is the T5 padding mask (its integer dtype kept).
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
from ncppo.errors import StateError, UsageError
from ncppo.io import (
    OUTPUT_MARKER,
    _alive,
    atomic_file,
    atomic_write_text,
    clear_output_dir,
    disk_full_is_one_line,
    guard_output_dir,
    mark_output_dir,
)

CACHE_FORMAT = "ncppo-latent-cache/1"
COMMAND = "data cache"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RERUN = "rerun `ncppo data cache` with the same arguments to rebuild it"
UNCAST = ("pair_index", "prompt_attention_mask")  # integer tensors: handed out as stored, not in the cache's dtype


def file_digest(path: Path) -> str:
    """blake2b of a file, read in 8 MiB blocks."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _safetensors_problem(path: Path) -> str | None:
    """Whether a safetensors file is whole, from its header alone: the tensors must end where the file ends."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return f"{size} bytes, too short for its header"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return f"unreadable header ({type(err).__name__}: {err})"
    if 8 + n + end != size:
        return f"{size} bytes where its header needs {8 + n + end} (truncated or overwritten)"
    return None


def _check_path(out_dir: Path, k: int) -> Path:
    return out_dir / f"shard-{k:05d}.check.json"


def _read_check(out_dir: Path, k: int) -> dict | None:
    try:
        check = json.loads(_check_path(out_dir, k).read_text())
        return check if isinstance(check, dict) and {"bytes", "blake2b", "pairs"} <= set(check) else None
    except (OSError, ValueError):
        return None


def _write_check(out_dir: Path, k: int, shard: Path, first_image_digests: dict) -> dict:
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        n = f.get_slice("pair_index").get_shape()[0] if "pair_index" in f.keys() else 0  # noqa: SIM118 (safe_open has no __contains__)
        skipped = int(f.metadata().get("skipped", 0))
    check = {"file": _shard_path(out_dir, k).name, "bytes": shard.stat().st_size, "blake2b": file_digest(shard),
             "pairs": n, "skipped": skipped, "first_image_digests": first_image_digests}
    atomic_write_text(_check_path(out_dir, k), json.dumps(check))
    return check


def shard_problem(out_dir: Path, k: int, full: bool = False) -> str | None:
    """Why finished shard ``k`` must be built (again): missing, no checksum, truncated or overwritten; or None."""
    path = _shard_path(out_dir, k)
    if not path.is_file():
        return "missing"
    if (problem := _safetensors_problem(path)) is not None:
        return problem
    check = _read_check(out_dir, k)
    if check is None:
        return "no checksum"
    if path.stat().st_size != check["bytes"]:
        return f"{path.stat().st_size} bytes, its checksum file says {check['bytes']}"
    if full and file_digest(path) != check["blake2b"]:
        return "its bytes do not match its checksum (overwritten or corrupted)"
    return None


def _fingerprint(pairs) -> str:
    digest = hashlib.sha256()
    for column in (pairs.meta.caption, pairs.meta.uid_w, pairs.meta.uid_l):
        for value in column.to_pylist():
            digest.update(value.encode() + b"\0")
    return digest.hexdigest()[:16]


def _shard_path(out_dir: Path, k: int) -> Path:
    return out_dir / f"shard-{k:05d}.safetensors"


def _earlier_cache(out_dir: Path) -> bool:
    """A cache from before outputs were marked: its config.json names the cache format."""
    if (out_dir / OUTPUT_MARKER).exists():
        return False
    try:
        return json.loads((out_dir / "config.json").read_text()).get("format") == CACHE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _indexed_digests(out_dir: Path) -> dict[str, str]:
    """Shard digests recorded in an earlier index.json (none when it is missing, damaged or older)."""
    try:
        return {s["file"]: s["blake2b"] for s in json.loads((out_dir / "index.json").read_text())["shards"]
                if "blake2b" in s}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _remove_dead_temporaries(out_dir: Path) -> None:
    """Temporaries of dead writers named as before ``io.atomic_file`` (which cleans its own)."""
    for path in out_dir.glob(".tmp-shard-*.safetensors"):
        pid = path.name.rsplit("-", 1)[-1].split(".")[0]
        if pid.isdigit() and not _alive(pid):
            path.unlink(missing_ok=True)


def build_cache(model, pairs, out_dir: str | os.PathLike, *, resolution: int, batch_size: int = 8,
                pairs_per_shard: int = 256, dtype: str = "float32", model_name: str = "", progress: bool = True,
                state=None, overwrite: bool = False, verify: bool = False) -> dict | None:
    """Encode every pair of ``pairs`` with ``model`` into ``out_dir``; returns the index (on the main process).

    ``out_dir`` follows :func:`ncppo.io.guard_output_dir` (an earlier, partial cache is resumed; another
    folder is refused unless ``overwrite``, which removes it first). Finished shards are checked (size and
    header; their digest with ``verify``) and damaged ones rebuilt.
    """
    from accelerate import PartialState

    if dtype not in DTYPES:
        raise UsageError(f"unknown cache dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    state = state or PartialState()
    out_dir = Path(out_dir)
    config = {"format": CACHE_FORMAT, "model": model_name, "model_kind": model.kind, "resolution": resolution,
              "dtype": dtype, "pairs": len(pairs), "pairs_per_shard": pairs_per_shard,
              "fingerprint": _fingerprint(pairs), "vae_scale_factor": model.pipeline.vae_scale_factor}
    config_path = out_dir / "config.json"
    # every process checks (reading only), so that a refusal stops them all rather than the main one alone
    guard_output_dir(out_dir, COMMAND, inputs=getattr(pairs.source, "paths", []),
                     overwrite=overwrite or _earlier_cache(out_dir))
    if config_path.is_file() and not overwrite:
        try:
            previous = json.loads(config_path.read_text())
            changed = {k: (previous.get(k), v) for k, v in config.items() if previous.get(k) != v}
        except (ValueError, AttributeError) as err:
            raise StateError(f"{config_path}: damaged ({err}), so the cache's settings are unknown; pass "
                             "--overwrite to rebuild the cache, or use a new output folder") from err
        if changed:
            raise DataError(f"{out_dir} holds a cache built with other settings {changed}; "
                            "use a new output folder, or pass --overwrite to rebuild it")
    indexed = {} if overwrite else _indexed_digests(out_dir)  # read by all before any process changes it
    state.wait_for_everyone()
    if state.is_main_process:
        if overwrite:
            clear_output_dir(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if not config_path.is_file():
            atomic_write_text(config_path, json.dumps(config, indent=2))
        mark_output_dir(out_dir, COMMAND)
        _remove_dead_temporaries(out_dir)
    state.wait_for_everyone()

    num_shards = max(1, -(-len(pairs) // pairs_per_shard))
    mine = [k for k in range(num_shards) if k % state.num_processes == state.process_index]
    todo = []
    for k in mine:
        problem = shard_problem(out_dir, k, full=verify)
        if problem == "no checksum":  # whole (by its header), from before checksums or its checksum file lost
            check = _write_check(out_dir, k, _shard_path(out_dir, k), {})
            if indexed.get(check["file"], check["blake2b"]) != check["blake2b"]:
                problem = "its bytes do not match the digest in index.json (overwritten or corrupted)"
            else:
                problem = None
        if problem is not None:
            if problem != "missing":
                print(f"{_shard_path(out_dir, k)}: {problem}; rebuilding it", flush=True)
            todo.append(k)
    if todo:  # the cache is incomplete again until its index is rewritten at the end
        (out_dir / "index.json").unlink(missing_ok=True)
    for k in range(num_shards):  # what finished shards know of uid conflicts: decided as in one run
        if k not in todo and (check := _read_check(out_dir, k)) is not None:
            pairs.remember_first_image_digests(check.get("first_image_digests", {}))
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
        _write_shard(out_dir, k, {k2: v.contiguous() for k2, v in tensors.items()}, metadata,
                     pairs.first_image_digests(indices))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return _write_index(out_dir, num_shards, config)


def _write_shard(out_dir: Path, k: int, tensors: dict, metadata: dict, first_image_digests: dict) -> None:
    """Shard ``k`` through a temporary file; a full disk is one line (finished shards stay: a rerun resumes)."""
    from safetensors.torch import save_file

    final = _shard_path(out_dir, k)
    with disk_full_is_one_line(final, "the shards written before it are kept and a rerun resumes from them"), \
            atomic_file(final) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _write_check(out_dir, k, tmp, first_image_digests)  # before the rename: a whole shard has one


@torch.no_grad()
def _encode(model, batch: PreferenceBatch, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    latents_w = model.encode_images(batch.pixel_values_w, sample=False)
    latents_l = model.encode_images(batch.pixel_values_l, sample=False)
    # the text exactly as training encodes it: embeddings, pooled ones, PixArt's T5 padding mask
    embeds, pooled, mask = model.encode_text(list(batch.prompts))
    out = {"latents_w": latents_w, "latents_l": latents_l, "prompt_embeds": embeds,
           "time_ids_w": batch.time_ids_w, "time_ids_l": batch.time_ids_l}
    if pooled is not None:
        out["pooled_prompt_embeds"] = pooled
    out = {k: v.detach().to("cpu", dtype) for k, v in out.items()}
    if mask is not None:  # token flags: kept in the encoder's own integer dtype
        out["prompt_attention_mask"] = mask.detach().to("cpu")
    out["pair_index"] = torch.tensor(batch.ids, dtype=torch.long)
    return out


def _write_index(out_dir: Path, num_shards: int, config: dict) -> dict:
    shards, total, skipped = [], 0, 0
    for k in range(num_shards):
        check = _read_check(out_dir, k)
        if check is None or not _shard_path(out_dir, k).is_file():
            raise StateError(f"{_shard_path(out_dir, k)}: missing or without its checksum after the build; {RERUN}")
        shards.append({"file": _shard_path(out_dir, k).name, "pairs": check["pairs"], "bytes": check["bytes"],
                       "blake2b": check["blake2b"]})
        total += check["pairs"]
        skipped += check["skipped"]
    index = {**config, "num_shards": num_shards, "cached_pairs": total, "skipped_pairs": skipped, "shards": shards}
    atomic_write_text(out_dir / "index.json", json.dumps(index, indent=2))
    return index


class LatentCache:
    """Batches from a finished cache, in the same :class:`PreferenceBatch` form as raw pairs.

    Shuffling is shard-local: shard order is shuffled, then pairs within each shard, so only one
    shard (memory-mapped) is read at a time.
    """

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32, verify: bool = False):
        """Open a finished cache: every shard's size is checked now, and with ``verify`` its digest too
        (each shard's digest is also checked whenever it is loaded). A damaged file is a :class:`StateError`
        naming it."""
        self.path = Path(path)
        index_path = self.path / "index.json"
        if not index_path.is_file():
            raise DataError(f"{self.path}: no index.json, so the cache is incomplete; run `ncppo data cache` "
                            "again with the same arguments to finish it")
        try:
            self.index = json.loads(index_path.read_text())
            if not all(isinstance(s, dict) and {"file", "pairs"} <= set(s) for s in self.index["shards"]):
                raise KeyError("a shard entry without 'file' and 'pairs'")
            int(self.index["cached_pairs"])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise StateError(f"{index_path}: damaged ({type(err).__name__}: {err}); rerun `ncppo data cache` with "
                             "the same arguments to rewrite it") from err
        if self.index.get("format") != CACHE_FORMAT:
            raise DataError(f"{self.path}: unknown cache format {self.index.get('format')!r}")
        self.dtype = dtype
        self.check(full=verify)

    def check(self, full: bool = False) -> None:
        """Sizes of all shards against the index (cheap); with ``full`` their digests (reads every byte)."""
        for k, shard in enumerate(self.index["shards"]):
            path = self.path / shard["file"]
            if not path.is_file():
                raise StateError(f"{path}: missing from the cache; {RERUN}")
            if "bytes" in shard and path.stat().st_size != shard["bytes"]:
                raise StateError(f"{path}: {path.stat().st_size} bytes, the index says {shard['bytes']} "
                                 f"(truncated or overwritten); {RERUN}")
            if full:
                self._check_digest(k)

    def _check_digest(self, k: int, data: bytes | None = None) -> None:
        shard = self.index["shards"][k]
        path = self.path / shard["file"]
        if "blake2b" not in shard:  # a cache from before checksums
            return
        digest = file_digest(path) if data is None else hashlib.blake2b(data, digest_size=32).hexdigest()
        if digest != shard["blake2b"]:
            raise StateError(f"{path}: its bytes do not match the digest in index.json (overwritten or corrupted); "
                             f"{RERUN}")

    def __len__(self) -> int:
        return int(self.index["cached_pairs"])

    def load_shard(self, k: int) -> dict[str, torch.Tensor]:
        """Shard ``k``'s tensors, read once and checked against its digest (garbage must not reach training:
        ~0.2 s per 100 MB shard)."""
        from safetensors.torch import load

        path = self.path / self.index["shards"][k]["file"]
        data = path.read_bytes()
        self._check_digest(k, data)
        try:
            tensors = load(data)
        except Exception as err:  # safetensors raises its own error types
            raise StateError(f"{path}: not a readable shard ({type(err).__name__}: {err}); {RERUN}") from err
        return {key: v if key in UNCAST else v.to(self.dtype) for key, v in tensors.items()}

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
        if self.index.get("model_kind") == "pixart" and "prompt_attention_mask" not in t and len(sel):
            raise DataError(f"{self.path}: a PixArt cache built before ncppo stored the T5 padding mask (PixArt "
                            "attends to the prompt's tokens only); rebuild it: `ncppo data cache ... --overwrite`")
        optional = {key: t[key][sel] if key in t else None for key in ("pooled_prompt_embeds", "prompt_attention_mask")}
        return PreferenceBatch(
            latents_w=t["latents_w"][sel], latents_l=t["latents_l"][sel], prompt_embeds=t["prompt_embeds"][sel],
            time_ids_w=t["time_ids_w"][sel], time_ids_l=t["time_ids_l"][sel], ids=t["pair_index"][sel].tolist(),
            **optional,
        )

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False) -> Iterator[PreferenceBatch]:
        for shard, rows in self.plan(batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last):
            yield self.make_batch(shard, rows)
