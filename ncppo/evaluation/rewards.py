"""Rewards behind one interface: ``reward(images, prompts) -> np.ndarray`` of one score per image.

Images are uint8 arrays ``(H, W, 3)``. The toy world's oracle is the first implementation; reward models
that load local weights (PickScore, HPSv2, ...) register here too, so scoring, win rates and curves
never depend on which reward produced the numbers.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np


class Reward(Protocol):
    name: str

    def __call__(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray: ...


def _oracle(weights: str | None = None) -> Reward:
    from ncppo.toy.oracle import OracleReward

    if weights:
        raise ValueError("the oracle reward takes no weights (it is programmatic)")
    return OracleReward()


_FACTORIES: dict[str, Callable[..., Reward]] = {"oracle": _oracle}
REWARD_NAMES = tuple(_FACTORIES)


def make_reward(name: str, weights: str | None = None) -> Reward:
    """The reward called ``name``, loading its weights from the local path ``weights`` when it has any."""
    if name not in _FACTORIES:
        close = difflib.get_close_matches(name, REWARD_NAMES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown reward {name!r}{hint} (known: {', '.join(REWARD_NAMES)})")
    return _FACTORIES[name](weights)
