"""Evaluation: paired generation with fixed seeds, rewards, win rates with bootstrap intervals, curves.

The names below are imported on first use (``import ncppo.evaluation`` stays cheap).
"""

import importlib

_NAMES = {
    "GenerationSpec": "generation", "Samples": "generation", "generate_samples": "generation",
    "REWARD_NAMES": "rewards", "Reward": "rewards", "make_reward": "rewards", "register_reward": "rewards",
    "reward_names": "rewards", "WinRate": "stats", "paired_win_rate": "stats",
}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"ncppo.evaluation.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
