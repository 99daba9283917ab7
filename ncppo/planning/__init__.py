"""Run planning: what a training run costs (FLOPs, memory, time) before any weight is loaded."""

from ncppo.planning.estimate import estimate_run

__all__ = ["estimate_run"]
