"""Evaluation: paired generation with fixed seeds, rewards, win rates with bootstrap intervals, curves."""

from ncppo.evaluation.generation import GenerationSpec, Samples, generate_samples
from ncppo.evaluation.rewards import REWARD_NAMES, Reward, make_reward
from ncppo.evaluation.stats import WinRate, paired_win_rate

__all__ = ["GenerationSpec", "Samples", "generate_samples", "REWARD_NAMES", "Reward", "make_reward", "WinRate",
           "paired_win_rate"]
