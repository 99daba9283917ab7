"""The toy world's programmatic judge: prompt adherence plus a visual-quality term, in [0, 1].

It reads an image the way a tiny model draws it (soft, blobby): the background colour is the median of
the border, the object is whatever differs from it, its colour is the mean over that region, its shape
is told by how much of its bounding box it fills (circle ~0.79, square ~1, triangle ~0.5), and quality
is the absence of pixel noise (the mean absolute Laplacian away from the object's edge).

A caption outside the world's grammar (e.g. a PartiPrompts line) is read loosely: the first colour word is
the object's colour, a colour word before "background" the background's, the first shape word the shape;
terms it does not name are left out and the weights of the others renormalised (quality always counts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ncppo.errors import UsageError
from ncppo.toy.world import COLOURS, SHAPES, Scene

EXPECTED_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
COLOUR_SCALE = 60.0  # RGB distance at which a colour score falls to 1/e
FOREGROUND_DISTANCE = 60.0  # a pixel this far from the background colour is object
NOISE_SCALE = 30.0  # mean |Laplacian| at which the quality score falls to 1/e


@dataclass(frozen=True)
class OracleWeights:
    """The weights of the oracle's terms (renormalised over the terms a caption names)."""

    object_colour: float = 0.35
    background: float = 0.25
    shape: float = 0.15
    quality: float = 0.25


def _box_blur(img: np.ndarray) -> np.ndarray:
    padded = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for axis in (0, 1):
        out |= np.roll(mask, 1, axis) | np.roll(mask, -1, axis)
    return out


def _colour_score(rgb: np.ndarray, name: str) -> float:
    return float(np.exp(-np.linalg.norm(rgb - np.array(COLOURS[name], dtype=np.float32)) / COLOUR_SCALE))


def caption_requirements(caption: str) -> dict[str, str]:
    """What a caption asks for: ``object_colour``, ``background``, ``shape`` (only those it names)."""
    try:
        scene = Scene.parse(caption)
        return {"object_colour": scene.object_colour, "background": scene.background, "shape": scene.shape}
    except ValueError:
        pass
    words = re.findall(r"[a-z]+", caption.lower())
    found = {}
    for i, word in enumerate(words):
        if word in COLOURS and i + 1 < len(words) and words[i + 1] == "background":
            found.setdefault("background", word)
        elif word in COLOURS:
            found.setdefault("object_colour", word)
        elif word.rstrip("s") in SHAPES:
            found.setdefault("shape", word.rstrip("s"))
    return found


def score_components(image: np.ndarray, caption: str) -> dict[str, float]:
    """Per-term scores in [0, 1] of one ``(H, W, 3)`` uint8 image for the terms ``caption`` names (and quality)."""
    wanted = caption_requirements(caption)
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    h, w, _ = img.shape
    smooth = _box_blur(img)  # colours and regions from a 3x3 average: pixel noise is the quality term's
    ring = np.ones((h, w), dtype=bool)
    ring[2:-2, 2:-2] = False
    background = np.median(smooth[ring], axis=0)
    foreground = np.linalg.norm(smooth - background, axis=2) > FOREGROUND_DISTANCE
    foreground &= ~ring
    scores = {}
    if "background" in wanted:
        scores["background"] = _colour_score(background, wanted["background"])
    if foreground.sum() < 0.02 * h * w:  # no object drawn
        scores.update({k: 0.0 for k in ("object_colour", "shape") if k in wanted})
    else:
        # object in both the raw and the smoothed image: no noise specks, no blurred edge blends
        core = foreground & (np.linalg.norm(img - background, axis=2) > FOREGROUND_DISTANCE)
        core = core if core.any() else foreground
        if "object_colour" in wanted:
            scores["object_colour"] = _colour_score(img[core].mean(axis=0), wanted["object_colour"])
        if "shape" in wanted:
            ys, xs = np.nonzero(foreground)
            fill = foreground.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
            likelihood = {s: np.exp(-abs(fill - EXPECTED_FILL[s]) / 0.08) for s in SHAPES}
            scores["shape"] = float(likelihood[wanted["shape"]] / sum(likelihood.values()))
    grey = img.mean(axis=2)
    laplacian = np.abs(4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:])
    outline = _dilate(_dilate(foreground) & _dilate(~foreground))  # the object's edge is not noise
    flat = ~outline[1:-1, 1:-1]
    scores["quality"] = float(np.exp(-laplacian[flat].mean() / NOISE_SCALE)) if flat.any() else 0.0
    return scores


def oracle_score(image: np.ndarray, caption: str, weights: OracleWeights = OracleWeights()) -> float:
    """The weighted mean of :func:`score_components` over the terms scored, so the score lies in [0, 1]."""
    parts = score_components(image, caption)
    total = sum(getattr(weights, k) for k in parts)
    return sum(getattr(weights, k) * v for k, v in parts.items()) / total


class OracleReward:
    """The toy world's reward behind the evaluation ``Reward`` interface: ``reward(images, prompts)``."""

    name = "oracle"

    def __init__(self, weights: OracleWeights = OracleWeights()):
        self.weights = weights

    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return np.array([oracle_score(np.asarray(i), p, self.weights) for i, p in zip(images, prompts)],
                        dtype=np.float64)


def oracle_reward(weights: str | None = None) -> OracleReward:
    """``make_reward("oracle")``'s factory (registered by :mod:`ncppo.toy`): the oracle takes no weights."""
    if weights:
        raise UsageError("the oracle reward takes no weights (it is programmatic)")
    return OracleReward()
