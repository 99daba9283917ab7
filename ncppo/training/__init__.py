"""Training: a Config dataclass and a Trainer (in the spirit of TRL), YAML configs with overrides.

The names are imported on first use, so ``ncppo.training.config`` (what ``ncppo train --help`` reads)
loads without torch.
"""

import importlib

_NAMES = {
    "DiskFullError": "ncppo.training.checkpoint",
    "ConfigError": "ncppo.training.config", "TrainConfig": "ncppo.training.config", "load_config": "ncppo.training.config",
    "TooManySkippedSteps": "ncppo.training.diagnostics", "Trainer": "ncppo.training.trainer",
    "TrainingDiverged": "ncppo.training.trainer", "TrainResult": "ncppo.training.trainer",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ncppo.training' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
