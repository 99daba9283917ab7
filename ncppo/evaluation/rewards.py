"""Rewards behind one interface: ``reward(images, prompts) -> np.ndarray`` of one score per image.

Images are uint8 arrays ``(H, W, 3)``. Every reward model loads from local files (``weights``), never a
hub: ``oracle`` (the toy world's programmatic judge, no weights), ``pickscore``, ``clip``, ``aesthetic``,
``hpsv2`` (``ncppo.evaluation.clip_rewards``) and ``imagereward`` (when its package is installed).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from ncppo.configuration import did_you_mean
from ncppo.errors import MissingDependencyError, UsageError


class Reward(Protocol):
    """What every reward is: a ``name`` and ``reward(images, prompts) -> np.ndarray`` (one score per image)."""

    name: str

    def __call__(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray: ...


RewardFactory = Callable[[str | None], Reward]  # weights (a local path, or None) -> a reward

_FACTORIES: dict[str, RewardFactory | str] = {}
# packages that register rewards of their own when imported (module path strings: no import arrow from
# here to them); they are imported on the first lookup of the registry
REWARD_PROVIDERS: list[str] = ["ncppo.toy"]
_providers_loaded = False


def register_reward(name: str, factory: RewardFactory | str, replace: bool = False) -> None:
    """Make ``make_reward(name, weights)`` call ``factory(weights)``; ``factory`` may be a callable or a
    ``"module:attribute"`` string, imported on first use (so registering costs nothing)."""
    if name in _FACTORIES and not replace and _FACTORIES[name] != factory:
        raise UsageError(f"a reward called {name!r} is already registered")
    _FACTORIES[name] = factory


def _load_providers() -> None:
    global _providers_loaded
    if not _providers_loaded:
        _providers_loaded = True
        for module in REWARD_PROVIDERS:
            importlib.import_module(module)


def reward_names() -> tuple[str, ...]:
    """Every registered reward's name."""
    _load_providers()
    return tuple(_FACTORIES)


def __getattr__(name: str):
    if name == "REWARD_NAMES":  # computed: providers register theirs on first use
        return reward_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resolve(factory: RewardFactory | str) -> RewardFactory:
    if callable(factory):
        return factory
    module, _, attribute = factory.partition(":")
    target = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def _image_reward(weights: str | None) -> Reward:
    try:
        import ImageReward as image_reward  # noqa: N813 (the package's own name)
    except ImportError as err:
        raise MissingDependencyError("image-reward", "reward 'imagereward'") from err
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


for _name, _factory in (("pickscore", "ncppo.evaluation.clip_rewards:PickScore.from_dir"),
                        ("clip", "ncppo.evaluation.clip_rewards:ClipReward.from_dir"),
                        ("aesthetic", "ncppo.evaluation.clip_rewards:AestheticScore.from_dir"),
                        ("hpsv2", "ncppo.evaluation.clip_rewards:HPSv2.from_dir"),
                        ("imagereward", _image_reward)):
    register_reward(_name, _factory)


def make_reward(name: str, weights: str | None = None) -> Reward:
    """The reward called ``name``, loading its weights from the local path ``weights`` when it has any."""
    names = reward_names()
    if name not in _FACTORIES:
        raise UsageError(f"unknown reward {name!r}{did_you_mean(name, names)} (known: {', '.join(names)})")
    return _resolve(_FACTORIES[name])(weights)
