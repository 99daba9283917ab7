"""Training: a Config dataclass and a Trainer (in the spirit of TRL), YAML configs with overrides."""

from ncppo.training.config import ConfigError, TrainConfig, load_config
from ncppo.training.trainer import Trainer, TrainingDiverged, TrainResult

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "Trainer", "TrainingDiverged", "load_config"]
