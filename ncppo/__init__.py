"""ncppo: Noise-Conditioned Perceptual Preference Optimization for text-to-image diffusion models.

The names of the README's Python API are importable from here (``from ncppo import PreferenceModel,
make_objective, training_step, Trainer, load_config``); each is imported on first use, so ``import ncppo``
stays cheap (no torch).
"""

import importlib as _importlib

__version__ = "0.1.0"

_NAMES = {
    # the core
    "PreferenceBatch": "ncppo.batch",
    "PreferenceModel": "ncppo.models.preference_model", "LoraSettings": "ncppo.models.preference_model",
    "load_pipeline": "ncppo.models.loading",
    "make_objective": "ncppo.objectives", "OBJECTIVE_NAMES": "ncppo.objectives",
    "training_step": "ncppo.step", "calibrate_beta": "ncppo.calibration",
    # data
    "PreferencePairs": "ncppo.data.pairs", "LatentCache": "ncppo.data.cache",
    # training
    "Trainer": "ncppo.training", "TrainConfig": "ncppo.training", "TrainResult": "ncppo.training",
    "load_config": "ncppo.training",
    # evaluation
    "GenerationSpec": "ncppo.evaluation", "generate_samples": "ncppo.evaluation", "make_reward": "ncppo.evaluation",
    "paired_win_rate": "ncppo.evaluation", "WinRate": "ncppo.evaluation",
    # the toy world
    "ToyConfig": "ncppo.toy.config", "ToyWorld": "ncppo.toy.stages",
    # errors
    "NcppoError": "ncppo.errors", "UsageError": "ncppo.errors", "MissingDependencyError": "ncppo.errors",
}
__all__ = ["__version__", *_NAMES]


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(_importlib.import_module(_NAMES[name]), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    raise AttributeError(f"module 'ncppo' has no attribute {name!r}")


def __dir__():
    return sorted(set(__all__) | {n for n in globals() if not n.startswith("_")})
