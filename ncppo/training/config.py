"""Training configuration: YAML files, ``section.key=value`` overrides and keyword values into the options
of :mod:`ncppo.training.options`, checked together.

Every mistake is caught before any model is loaded: unknown keys (with a did-you-mean), wrong types,
an objective that needs a frozen reference with a model that has none, an effective batch the process
count cannot make.
"""

from __future__ import annotations

import copy
import os
import types
import typing
from pathlib import Path

from ncppo.configuration import ConfigError, apply, check_choice, flatten, parse_overrides, read_mapping
from ncppo.training.options import DataConfig, ModelConfig, ObjectiveConfig, OptimConfig, TrainConfig

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "ObjectiveConfig", "OptimConfig", "TrainConfig",
           "config_record", "is_hub_id", "load_config", "load_run_config", "parse_overrides", "validate"]


# keys a resume may change (``resume: true``); every other difference from the checkpoint's run is refused
CHANGEABLE_ON_RESUME = frozenset({
    "output_dir", "resume", "overwrite_output_dir", "max_steps", "max_train_minutes", "checkpoint_every_steps",
    "checkpoint_every_minutes", "keep_last_checkpoints", "log_every", "report_to", "validation_every",
    "validation_prompts", "validation_steps", "max_nonfinite_in_a_row", "max_skipped_step_fraction",
    "skipped_step_check_after", "diagnostics_window", "gradient_checkpointing", "tracker_project", "run_name",
})
RESUME_CHOICES = (True, False, "force")

# literals so that `ncppo train --help` loads without torch; tests/test_training_config.py checks them against
# their owners (ncppo.models.preference_model.FINETUNE_MODES and REFERENCE_PASSES, ncppo.data.schema.TIE_POLICIES,
# ncppo.flow.WEIGHTINGS)
_CHOICES = {
    "model.finetune": ("lora", "full"),
    "model.reference_pass": ("auto", "separate", "difference"),
    "data.tie_policy": ("drop", "keep", "error"),
    "optim.optimizer": ("adamw", "adamw8bit"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "model.timestep_weighting": ("uniform", "logit_normal"),  # ncppo.flow.WEIGHTINGS; null: the model's default
}
_REPORTERS = ("jsonl", "csv", "tensorboard", "wandb")
# YAML 1.1 reads a bare no/off/false (yes/on/true) as a boolean: what the word meant for these string keys
_BOOLEAN_WORDS = {"mixed_precision": {False: "no"}}
# list keys whose items never hold a comma: "jsonl,wandb" is two items (a validation prompt may hold commas)
_COMMA_LISTS = frozenset({"report_to", "model.lora_targets"})


def _is_list(hint) -> bool:
    """A list (or a list or null): not a union with other types, where a string is not a one-item list."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        return len(options) == 1 and _is_list(options[0])
    return typing.get_origin(hint) is list


def _yaml_pitfalls(key: str, value, hint):
    """What a YAML value meant: ``mixed_precision: no`` (read as false) is ``"no"``; a single string where a
    list is expected (``report_to: wandb``) is a one-element list (split at commas for :data:`_COMMA_LISTS`)."""
    if isinstance(value, bool) and value in _BOOLEAN_WORDS.get(key, {}):
        return _BOOLEAN_WORDS[key][value]
    if isinstance(value, str) and _is_list(hint):
        items = value.split(",") if key in _COMMA_LISTS else [value]
        return [item.strip() for item in items if item.strip()]
    return value


# sections a run's config.yaml records beside the settings (derived values, code and machine): read past
RECORD_SECTIONS = ("resolved", "provenance")
LOCAL_PATHS = ("output_dir", "data.cache", "data.image_dir")  # always folders on this machine
PATHS_OR_HUB_IDS = ("model.pretrained", "data.source")  # a local path, or a hub id (``org/name``)


def is_hub_id(name: str, base: str | Path | None = None) -> bool:
    """Whether ``name`` reads as a hub id (``org/name``) rather than a local path (one that exists, relative
    to ``base`` when given, is a path)."""
    parts = name.split("/")
    local = Path(base, name) if base is not None else Path(name)
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))
            and not local.expanduser().exists())


def _get(config: TrainConfig, key: str):
    section, _, leaf = key.rpartition(".")
    return getattr(getattr(config, section) if section else config, leaf)


def _set(config: TrainConfig, key: str, value) -> None:
    section, _, leaf = key.rpartition(".")
    setattr(getattr(config, section) if section else config, leaf, value)


def _absolute_paths(config: TrainConfig, base: Path, keys) -> None:
    """Make the path values of ``keys`` absolute, reading relative ones from ``base`` (hub ids stay)."""
    for key in keys:
        value = _get(config, key)
        if not value or (key in PATHS_OR_HUB_IDS and is_hub_id(value, base)):
            continue
        path = Path(value).expanduser()
        _set(config, key, os.path.normpath(path if path.is_absolute() else base / path))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **values) -> TrainConfig:
    """A validated :class:`TrainConfig` from a YAML file, ``key=value`` overrides and keyword values.

    Paths (``output_dir``, ``model.pretrained``, ``data.source``, ``data.cache``) come back absolute: a
    relative path in the file is read from the file's folder, one in an override or a keyword value from
    the current folder; a hub id (``org/name`` that is not a local folder) stays as it is. A run's own
    ``config.yaml`` loads too: its :data:`RECORD_SECTIONS` (``resolved``, ``provenance``) are read past.
    """
    config = TrainConfig()
    if path is not None:
        mapping = read_mapping(path)
        for section in RECORD_SECTIONS:
            mapping.pop(section, None)
        apply(config, mapping, adjust=_yaml_pitfalls)
        given = flatten(mapping)
        _absolute_paths(config, Path(path).expanduser().absolute().parent,
                        [k for k in (*LOCAL_PATHS, *PATHS_OR_HUB_IDS) if k in given])
    if overrides:
        apply(config, parse_overrides(overrides), adjust=_yaml_pitfalls)
    if values:
        apply(config, values, adjust=_yaml_pitfalls)
    _absolute_paths(config, Path.cwd(), (*LOCAL_PATHS, *PATHS_OR_HUB_IDS))  # the rest: from the current folder
    validate(config)
    return config


def config_record(config: TrainConfig) -> dict:
    """The config as a run records it: a mapping :func:`load_config` reads back, with absolute paths."""
    record = copy.deepcopy(config)
    _absolute_paths(record, Path.cwd(), (*LOCAL_PATHS, *PATHS_OR_HUB_IDS))
    return record.to_dict()


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` a training run recorded in ``RUN/config.yaml``."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run (no config.yaml)")
    return load_config(path)


def validate(config: TrainConfig) -> None:
    d = config.to_dict()
    for key, choices in _CHOICES.items():
        section, _, leaf = key.rpartition(".")
        value = d[section][leaf] if section else d[leaf]
        if value is not None:  # null: a key that defaults to the model's own choice (its type check refused others)
            check_choice(value, choices, key)
    for reporter in config.report_to:
        if reporter not in _REPORTERS:
            raise ConfigError(f"report_to: {reporter!r} is not one of {', '.join(_REPORTERS)}")
    if not config.model.pretrained:
        raise ConfigError("model.pretrained: give the diffusers pipeline folder to train")
    if not (config.data.source or config.data.cache):
        raise ConfigError("data: give data.source (pairs) or data.cache (a latent cache)")
    positive = {"batch_size": config.batch_size, "gradient_accumulation_steps": config.gradient_accumulation_steps,
                "max_steps": config.max_steps, "data.resolution": config.data.resolution,
                "model.lora_rank": config.model.lora_rank, "keep_last_checkpoints": config.keep_last_checkpoints,
                "log_every": config.log_every, "max_nonfinite_in_a_row": config.max_nonfinite_in_a_row,
                "skipped_step_check_after": config.skipped_step_check_after,
                "diagnostics_window": config.diagnostics_window}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if config.resume not in RESUME_CHOICES or not isinstance(config.resume, (bool, str)):
        raise ConfigError(f"resume: expected true, false or force, got {config.resume!r}")
    fraction = config.max_skipped_step_fraction
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"max_skipped_step_fraction: must be in [0, 1] or null, got {fraction}")
    if config.model.guidance is not None and not 0.0 <= config.model.guidance < float("inf"):
        raise ConfigError(f"model.guidance: must be a finite number >= 0 or null, got {config.model.guidance}")
    if not 0.0 <= config.data.prompt_dropout < 1.0:
        raise ConfigError(f"data.prompt_dropout: must be in [0, 1), got {config.data.prompt_dropout}")
    from ncppo.objectives import make_objective

    try:  # the objective's module owns its choices
        objective = make_objective(**config.objective.options())
    except ValueError as err:
        raise ConfigError(f"objective: {err}") from err
    if config.data.tie_policy == "keep" and not objective.supports_ties:
        raise ConfigError(f"data.tie_policy: 'keep' trains ties, which {config.objective.name} cannot use "
                          "(it has no loser to compare with); use 'drop'")
    if config.objective.calibration_batches < 1:
        raise ConfigError(f"objective.calibration_batches: must be >= 1, got {config.objective.calibration_batches}")
