"""Paired win rates with bootstrap 95% intervals over prompts.

``B`` wins an item when its reward is higher than ``A``'s on the same (prompt, seed); a tie counts half.
Items of one prompt are not independent (same text), so the bootstrap resamples prompts, not items.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np


def bradley_terry_probability(gap, temperature: float):
    """``P(a beats b) = sigmoid((r_a - r_b) / temperature)`` for a reward gap ``r_a - r_b`` (the Bradley-Terry
    choice of the simulated annotators), written with ``tanh`` so that large gaps do not overflow."""
    return 0.5 * (1.0 + np.tanh(np.asarray(gap) / (2 * temperature)))


@dataclass(frozen=True)
class WinRate:
    """A paired win rate of B over A with its bootstrap interval; ``str()`` is ``"61.2% [55.0, 67.1]"``.

    Parameters:
        rate: B's share of wins, ties counted half.
        low: the interval's lower end (95% by default); ``high`` its upper end.
        wins: items B wins; ``ties`` and ``losses`` likewise.
        prompts: the bootstrap units (prompts).
    """

    rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    prompts: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> WinRate:
        """The win rate in a :meth:`to_dict` mapping (other keys, e.g. a comparison's names, are ignored)."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})

    @property
    def counts(self) -> str:
        """``"wins/ties/losses"``."""
        return f"{self.wins}/{self.ties}/{self.losses}"

    def __str__(self) -> str:
        return f"{100 * self.rate:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def paired_win_rate(reward_a, reward_b, groups=None, n_boot: int = 2000, seed: int = 0, tie_tolerance: float = 0.0,
                    confidence: float = 0.95) -> WinRate:
    """Win rate of B over A from paired rewards; ``groups`` (e.g. prompt index) are the bootstrap units."""
    a, b = np.asarray(reward_a, dtype=np.float64), np.asarray(reward_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired rewards need two equal, non-empty 1-D arrays; got shapes {a.shape} and {b.shape}")
    groups = np.arange(a.size) if groups is None else np.asarray(groups)
    if groups.shape != a.shape:
        raise ValueError(f"groups has shape {groups.shape}; expected {a.shape}")
    diff = b - a
    outcome = np.where(diff > tie_tolerance, 1.0, np.where(diff < -tie_tolerance, 0.0, 0.5))
    _, unit = np.unique(groups, return_inverse=True)
    n_units = int(unit.max()) + 1
    unit_sum = np.bincount(unit, weights=outcome, minlength=n_units)
    unit_count = np.bincount(unit, minlength=n_units).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(n_units, size=(n_boot, n_units))  # percentile bootstrap over prompts
    boot = unit_sum[draws].sum(axis=1) / unit_count[draws].sum(axis=1)
    tail = (1 - confidence) / 2
    return WinRate(float(outcome.mean()), float(np.quantile(boot, tail)), float(np.quantile(boot, 1 - tail)),
                   int((outcome == 1).sum()), int((outcome == 0.5).sum()), int((outcome == 0).sum()), n_units)


@dataclass(frozen=True)
class MeanInterval:
    """A mean reward with its percentile bootstrap interval over prompts; ``str()`` is ``"21.30 [21.10, 21.52]"``."""

    mean: float
    low: float
    high: float
    prompts: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]"


def mean_interval(values, groups=None, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> MeanInterval:
    """The mean of ``values`` with a bootstrap interval that resamples ``groups`` (prompts), as the win rates do."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"mean_interval needs a non-empty 1-D array; got shape {x.shape}")
    groups = np.arange(x.size) if groups is None else np.asarray(groups)
    _, unit = np.unique(groups, return_inverse=True)
    n_units = int(unit.max()) + 1
    unit_sum = np.bincount(unit, weights=x, minlength=n_units)
    unit_count = np.bincount(unit, minlength=n_units).astype(np.float64)
    draws = np.random.default_rng(seed).integers(n_units, size=(n_boot, n_units))
    boot = unit_sum[draws].sum(axis=1) / unit_count[draws].sum(axis=1)
    tail = (1 - confidence) / 2
    return MeanInterval(float(x.mean()), float(np.quantile(boot, tail)), float(np.quantile(boot, 1 - tail)), n_units)
