"""Paired win rates with bootstrap 95% intervals over prompts.

``B`` wins an item when its reward is higher than ``A``'s on the same (prompt, seed); a tie counts half.
Items of one prompt are not independent (same text), so the bootstrap resamples prompts, not items.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class WinRate:
    rate: float  # of B over A, ties counted half
    low: float  # bootstrap 95% interval
    high: float
    wins: int
    ties: int
    losses: int
    prompts: int

    def to_dict(self) -> dict:
        return asdict(self)

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
