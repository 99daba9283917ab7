"""Objectives: preference losses (SFT, DPO, CPO) over a loss space (noise or NCP), by name."""

from ncppo.objectives.preference import CPO, DEFAULT_BETA, DPO, SFT, PairLosses
from ncppo.objectives.registry import OBJECTIVE_NAMES, Objective, make_objective
from ncppo.objectives.spaces import NoisedBatch, NoiseSpace, PerceptualSpace

__all__ = [
    "CPO", "DEFAULT_BETA", "DPO", "OBJECTIVE_NAMES", "SFT", "NoiseSpace", "NoisedBatch", "Objective",
    "PairLosses", "PerceptualSpace", "make_objective",
]
