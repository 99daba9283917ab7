"""Rewards behind one interface: ``reward(images, prompts) -> np.ndarray`` of one score per image.

Images are uint8 arrays ``(H, W, 3)``. Every reward model loads from local files (``weights``), never a
hub: ``oracle`` (the toy world's programmatic judge, no weights), ``pickscore``, ``clip``, ``aesthetic``,
``hpsv2`` (``ncppo.evaluation.clip_rewards``) and ``imagereward`` (when its package is installed).
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


def _clip_family(cls_name: str):
    def make(weights: str | None) -> Reward:
        from ncppo.evaluation import clip_rewards

        return getattr(clip_rewards, cls_name).from_dir(weights)

    return make


def _image_reward(weights: str | None) -> Reward:
    try:
        import ImageReward as image_reward  # noqa: N813 (the package's own name)
    except ImportError as err:
        raise ValueError("reward 'imagereward' needs the ImageReward package (pip install image-reward); "
                         "it is optional and not installed") from err
    from ncppo.evaluation.clip_rewards import _require_dir

    path = _require_dir(weights, "imagereward", "the ImageReward.pt checkpoint (and med_config.json beside it)")
    model = image_reward.load(str(path), med_config=str(path.parent / "med_config.json"))

    class _ImageReward:
        name = "imagereward"

        def __call__(self, images, prompts) -> np.ndarray:
            from PIL import Image

            return np.array([model.score(p, [Image.fromarray(np.asarray(i))]) for i, p in zip(images, prompts)],
                            dtype=np.float64)

    return _ImageReward()


_FACTORIES: dict[str, Callable[..., Reward]] = {
    "oracle": _oracle,
    "pickscore": _clip_family("PickScore"),
    "clip": _clip_family("ClipReward"),
    "aesthetic": _clip_family("AestheticScore"),
    "hpsv2": _clip_family("HPSv2"),
    "imagereward": _image_reward,
}
REWARD_NAMES = tuple(_FACTORIES)


def make_reward(name: str, weights: str | None = None) -> Reward:
    """The reward called ``name``, loading its weights from the local path ``weights`` when it has any."""
    if name not in _FACTORIES:
        close = difflib.get_close_matches(name, REWARD_NAMES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown reward {name!r}{hint} (known: {', '.join(REWARD_NAMES)})")
    return _FACTORIES[name](weights)
