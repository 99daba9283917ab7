"""Which captions each part of the toy world sees: held-out compositions.

The world's 168 captions are 56 (object colour, background) pairs times 3 shapes. Each pair gives one
shape to each split, rotating with the pair's index, so every split holds every colour pairing and every
shape, and a validation or test caption is a composition the preference data never shows (its colours
appear there, with another shape). The rule is fixed (no seed): the split is the same on every machine
and for every world seed.

- ``train``: the captions the preference data (the ``pairs`` stage) is sampled for.
- ``validation``: where settings and methods are chosen (the ablation benchmark's selection).
- ``test``: the numbers the report and the benchmarks state; never used to choose anything.
"""

from __future__ import annotations

from ncppo.errors import UsageError
from ncppo.toy.world import COLOURS, SHAPES, Scene, all_scenes

SPLITS = ("train", "validation", "test")


def split_of(scene: Scene) -> str:
    """The split of ``scene``'s caption."""
    colours = list(COLOURS)
    pairs = [(o, b) for o in colours for b in colours if b != o]
    index = pairs.index((scene.object_colour, scene.background))
    return SPLITS[(index + SHAPES.index(scene.shape)) % len(SPLITS)]


def split_captions(split: str) -> list[str]:
    """The captions of ``split`` (``train``, ``validation`` or ``test``), in the world's caption order."""
    if split not in SPLITS:
        raise UsageError(f"unknown toy-world split {split!r}; expected one of {', '.join(SPLITS)}")
    return [s.caption for s in all_scenes() if split_of(s) == split]
