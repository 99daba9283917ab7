"""The toy world: small images of a coloured shape on a coloured background, with captions.

A caption names three things a model can get right or wrong: the object's colour, the background's
colour and the shape ("a red circle on a blue background"). A tiny model learns colours quickly and
shapes slowly, so the world leaves room to be good or bad at following captions, and its samples can
also be clean or noisy, which the oracle's quality term sees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
    "orange": (240, 140, 30), "purple": (140, 50, 180), "white": (240, 240, 240), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
_CAPTION = re.compile(r"^an? (?P<object>\w+) (?P<shape>\w+) on an? (?P<background>\w+) background$")


@dataclass(frozen=True)
class Scene:
    """What a caption asks for."""

    object_colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        article = "an" if self.object_colour[0] in "aeiou" else "a"
        bg_article = "an" if self.background[0] in "aeiou" else "a"
        return f"{article} {self.object_colour} {self.shape} on {bg_article} {self.background} background"

    @classmethod
    def parse(cls, caption: str) -> Scene:
        match = _CAPTION.match(caption.strip().lower())
        if not match or match["object"] not in COLOURS or match["background"] not in COLOURS \
                or match["shape"] not in SHAPES:
            raise ValueError(f"not a toy-world caption: {caption!r} (expected 'a <colour> <shape> on a <colour> "
                             f"background' with colours {', '.join(COLOURS)} and shapes {', '.join(SHAPES)})")
        return cls(match["object"], match["shape"], match["background"])


def all_scenes() -> list[Scene]:
    """Every caption of the world (object colour != background colour): 8 x 7 x 3 = 168."""
    return [Scene(o, s, b) for o in COLOURS for b in COLOURS if b != o for s in SHAPES]


def shape_mask(shape: str, size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """A boolean mask of ``shape`` (circle, square or upward triangle) of half-size ``radius``."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) + 0.5
    cy, cx = centre
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    if shape == "square":
        r = radius * 0.886  # the same area as the circle
        return (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    if shape == "triangle":
        r = radius * 1.35
        top, bottom = cy - r, cy + r * 0.75
        half_width = (yy - top) / (bottom - top) * r * 1.1
        return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def random_placement(size: int, rng: np.random.Generator) -> tuple[tuple[float, float], float]:
    """An object's ``(centre, radius)``: a half-size of 0.2-0.3 of the image, wholly inside it."""
    radius = float(rng.uniform(0.2, 0.3)) * size
    margin = radius * 1.2
    return tuple(float(v) for v in rng.uniform(margin, size - margin, size=2)), radius


def render(scene: Scene, size: int = 32, rng: np.random.Generator | None = None, noise: float = 0.0) -> np.ndarray:
    """A ``(size, size, 3)`` uint8 image of ``scene``, at a random place and size, with optional pixel noise."""
    rng = rng or np.random.default_rng()
    centre, radius = random_placement(size, rng)
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = COLOURS[scene.background]
    image[shape_mask(scene.shape, size, centre, radius)] = COLOURS[scene.object_colour]
    if noise > 0:
        image += rng.normal(0.0, noise * 255.0, size=image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def sample_scenes(n: int, rng: np.random.Generator) -> list[Scene]:
    scenes = all_scenes()
    return [scenes[i] for i in rng.integers(0, len(scenes), size=n)]
