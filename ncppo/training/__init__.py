"""Training: a Config dataclass and a Trainer (in the spirit of TRL), YAML configs with overrides."""

from ncppo.training.checkpoint import DiskFullError
from ncppo.training.config import ConfigError, TrainConfig, load_config
from ncppo.training.trainer import TooManySkippedSteps, Trainer, TrainingDiverged, TrainResult

__all__ = ["ConfigError", "DiskFullError", "TooManySkippedSteps", "TrainConfig", "TrainResult", "Trainer",
           "TrainingDiverged", "load_config"]
