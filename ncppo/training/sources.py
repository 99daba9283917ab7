"""What the trainer reads: one data interface over raw pairs and the latent cache, the per-process batch
plan, and prompt dropout as an operation on a batch.

The loop sees only :class:`TrainingData` (``plan`` an epoch, turn one planned item into a
:class:`~ncppo.batch.PreferenceBatch`) and :class:`MicroBatches` (micro-step index -> this process's
batch); it never asks whether the pairs are raw or cached. Everything random in a batch (crops, flips,
dropout) derives from (seed, micro-step index, rank), so a resumed run replays an uninterrupted one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ncppo.batch import PreferenceBatch
from ncppo.configuration import ConfigError

# the streams of randomness a micro-step draws from (the last part of its seed)
DATA_STREAM, DROPOUT_STREAM, CALIBRATION_STREAM = 1, 2, 3


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence: neighbouring tuples give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


@runtime_checkable
class TrainingData(Protocol):
    """The trainer's data interface (raw pairs, a latent cache, or your own).

    ``plan`` lists one epoch's batches as opaque items (cheap: nothing is loaded), the same for the same
    seed; ``batch(item, rng)`` makes the batch of one item, or None when none of its pairs is usable
    (counted in ``skip_report``); ``rng`` is the item's own generator (for crops and flips).
    """

    def __len__(self) -> int: ...

    def plan(self, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool) -> list: ...

    def batch(self, item, rng: np.random.Generator) -> PreferenceBatch | None: ...

    def skip_report(self) -> str: ...

    def summary(self) -> dict: ...


class PairsData:
    """Raw preference pairs (:class:`ncppo.data.pairs.PreferencePairs`), decoded and cropped per batch."""

    def __init__(self, pairs, resolution: int, *, random_crop: bool = False, random_flip: bool = False,
                 source: str = ""):
        self.pairs, self.resolution, self.random_crop, self.random_flip = pairs, resolution, random_crop, random_flip
        self.source = source

    def __len__(self) -> int:
        return len(self.pairs)

    def plan(self, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool) -> list:
        return self.pairs.plan(batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)

    def batch(self, item, rng: np.random.Generator) -> PreferenceBatch | None:
        return self.pairs.collate(item, self.resolution, rng=rng, random_crop=self.random_crop,
                                  random_flip=self.random_flip)

    def skip_report(self) -> str:
        return self.pairs.skips.summary()

    def summary(self) -> dict:
        return {"source": self.source, "pairs": len(self.pairs), "skips": self.pairs.skips.as_dict()}


class CacheData:
    """A latent cache (:class:`ncppo.data.cache.LatentCache`): latents and prompt embeddings, no encoders run."""

    def __init__(self, cache, source: str = ""):
        self.cache, self.source = cache, source

    def check_model(self, model) -> None:
        built = self.cache.index["model_kind"]
        if built != model.kind:
            raise ConfigError(f"data.cache was built for a {built} model, model.pretrained is {model.kind}")

    def __len__(self) -> int:
        return len(self.cache)

    def plan(self, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool) -> list:
        return self.cache.plan(batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)

    def batch(self, item, rng: np.random.Generator) -> PreferenceBatch:
        return self.cache.make_batch(*item)

    def _skipped(self) -> int:
        return int(self.cache.index.get("skipped_pairs", 0))

    def skip_report(self) -> str:
        skipped = self._skipped()
        return f"{skipped} pairs skipped (bad images) when the cache was built" if skipped else "no pairs skipped"

    def summary(self) -> dict:
        return {"source": self.source, "pairs": len(self.cache), "skips": {"total": self._skipped(), "when": "cache build"}}


def drop_prompts(batch: PreferenceBatch, drop: np.ndarray,
                 empty: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None) -> PreferenceBatch:
    """``batch`` with the prompts of the pairs where ``drop`` is true replaced by the empty prompt: as text
    when the batch carries text, else by ``empty``, the empty prompt's ``(embeds, pooled, attention_mask)``
    (:meth:`~ncppo.models.preference_model.PreferenceModel.encode_text`): its embeddings, SDXL's, SD3's and
    FLUX's pooled ones, and PixArt's T5 padding mask (the prompt's mask would let the empty embeddings'
    padding tokens be attended to)."""
    if not drop.any():
        return batch
    if batch.prompts is not None and batch.prompt_embeds is None:
        return batch.replace(prompts=["" if d else q for d, q in zip(drop, batch.prompts)])
    if empty is None:
        raise ValueError("prompt dropout of embedded prompts needs the empty prompt's encoding: PromptDropout(p, model)")
    rows = torch.from_numpy(drop)
    changes = {}
    for key, value in zip(("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask"), empty):
        kept = getattr(batch, key)
        if kept is None:
            continue
        if value is None:
            raise ValueError(f"prompt dropout: the batch has {key} but the empty prompt's encoding has none "
                             "(the batch was encoded for another kind of model)")
        new = kept.clone()
        new[rows] = value.to(new)
        changes[key] = new
    return batch.replace(**changes)


class PromptDropout:
    """Replace each prompt by the empty one with probability ``p`` (classifier-free guidance training)."""

    def __init__(self, p: float, model=None):
        self.p = p
        # text batches need no embeddings; cached ones get the model's empty prompt (with PixArt's mask)
        self.empty = model.encode_text([""]) if p > 0 and model is not None else None

    def __call__(self, batch: PreferenceBatch, rng: np.random.Generator) -> PreferenceBatch:
        if self.p <= 0:
            return batch
        return drop_prompts(batch, rng.random(batch.batch_size) < self.p, self.empty)


class MicroBatches:
    """Micro-step index -> this process's batch: epoch ``e`` is ``data.plan`` at seed (seed, e), its full
    batches dealt to the processes in turn (batch ``k`` to rank ``k % num_processes``)."""

    def __init__(self, data: TrainingData, batch_size: int, seed: int, num_processes: int = 1,
                 process_index: int = 0, dropout: PromptDropout | None = None):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.dropout = dropout or PromptDropout(0.0)
        self._epoch: tuple[int, list] | None = None
        self.per_epoch = len(self.local_plan(0))  # batches per epoch and process (every epoch alike)

    def local_plan(self, epoch: int) -> list:
        if self._epoch is None or self._epoch[0] != epoch:
            plan = self.data.plan(self.batch_size, shuffle=True, seed=derived_seed(self.seed, epoch), drop_last=True)
            usable = len(plan) - len(plan) % self.num_processes
            if usable == 0:
                raise ConfigError(f"the data has {len(plan)} full batches of {self.batch_size} pairs: too few for "
                                  f"{self.num_processes} process(es) ({len(self.data)} pairs; "
                                  f"{self.data.skip_report()})")
            self._epoch = (epoch, plan[self.process_index:usable:self.num_processes])
        return self._epoch[1]

    def _rng(self, micro_index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng(derived_seed(self.seed, micro_index, self.process_index, stream))

    def __call__(self, micro_index: int) -> PreferenceBatch | None:
        epoch, k = divmod(micro_index, self.per_epoch)
        batch = self.data.batch(self.local_plan(epoch)[k], self._rng(micro_index, DATA_STREAM))
        if batch is None:
            return None
        return self.dropout(batch, self._rng(micro_index, DROPOUT_STREAM))

    def generator(self, micro_index: int, stream: int = 0) -> torch.Generator:
        """The torch generator of a micro-step's noise (stream 0) or of a calibration batch."""
        return torch.Generator().manual_seed(derived_seed(self.seed, micro_index, self.process_index, stream))
