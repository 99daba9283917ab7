"""How a :class:`~ncppo.training.config.TrainConfig` becomes the parts of a run: the accelerator, the model,
the objective, the data, the optimiser and its schedule, and the derived numbers (accumulation, effective
batch, learning rate). The trainer and the evaluation of finished runs (:mod:`ncppo.evaluation.runs`)
build models through the same :func:`build_model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ncppo.configuration import ConfigError
from ncppo.precision import HALF_DTYPES


@dataclass(frozen=True)
class Derived:
    """The numbers a run derives from its config and the process count."""

    gradient_accumulation_steps: int
    num_processes: int
    batch_size_per_process: int
    effective_batch: int
    learning_rate: float

    @classmethod
    def of(cls, config, num_processes: int) -> Derived:
        accumulation = config.resolved_accumulation(num_processes)
        effective = config.batch_size * accumulation * num_processes
        lr = config.optim.learning_rate * (effective if config.optim.scale_lr else 1)  # Diffusion-DPO's scale_lr
        return cls(accumulation, num_processes, config.batch_size, effective, lr)


def check_local_path(key: str, value: str) -> None:
    """A path-looking value that does not exist is an error naming its key (a hub id passes through)."""
    from ncppo.training.config import is_hub_id

    if value and not is_hub_id(value) and not Path(value).expanduser().exists():
        raise ConfigError(f"{key}: {value} does not exist (relative paths in a config file are read from the "
                          "file's folder, on the command line from the current folder)")


def build_accelerator(config, trackers: list):
    """accelerate's ``Accelerator`` for the run (CPU when there is no GPU), with its trackers."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    # Several trainers in one process (the toy world trains six methods): accelerate keeps one global
    # state and refuses a second precision. Without a process group there is nothing to keep: reset it.
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        AcceleratorState._reset_state(reset_partial_state=True)
    out = Path(config.output_dir)
    return Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available(),
                       log_with=trackers or None,
                       project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")))


def build_model(model_config):
    """The :class:`~ncppo.models.preference_model.PreferenceModel` of a config's ``model`` section; a ``guidance`` or
    ``timestep_weighting`` the model cannot use is a :class:`ConfigError` naming the key."""
    from ncppo.errors import UsageError
    from ncppo.flow import process_for
    from ncppo.models.loading import load_pipeline, pipeline_kind
    from ncppo.models.preference_model import LoraSettings, PreferenceModel
    from ncppo.models.transformers_backbone import BACKBONES, training_guidance

    check_local_path("model.pretrained", model_config.pretrained)
    lora = LoraSettings(model_config.lora_rank, model_config.lora_alpha, tuple(model_config.lora_targets))
    pipeline = load_pipeline(model_config.pretrained)
    kind = pipeline_kind(pipeline)
    checks = {"guidance": lambda v: training_guidance(kind, BACKBONES[kind].denoiser(pipeline), v),
              "timestep_weighting": lambda v: process_for(pipeline.scheduler, weighting=v)}
    options = {"guidance": model_config.guidance, "timestep_weighting": model_config.timestep_weighting}
    for key, value in options.items():  # PreferenceModel checks them too, but could not name the config key
        if value is not None:
            try:
                checks[key](value)
            except UsageError as err:
                raise ConfigError(f"model.{key}: {err}") from err
    if model_config.reference_pass == "difference" and model_config.finetune != "lora":
        raise ConfigError("model.reference_pass: 'difference' needs model.finetune 'lora' (the reference is the base "
                          "under the adapters); a full fine-tune uses 'separate' or 'auto'")
    return PreferenceModel(pipeline, finetune=model_config.finetune, lora=lora,
                           reference_pass=model_config.reference_pass, **options)


def prepare_model(model, config, device: torch.device, objective=None) -> None:
    """Check the objective (``objective``, default the config's) against the model (:func:`check_objective`), then
    precision, device and training mode: on GPU the frozen weights go to the half precision of
    ``mixed_precision`` (on CPU half kernels are slow: they stay float32), the trained ones stay float32."""
    check_objective(model, objective if objective is not None else build_objective(config.objective),
                    config.objective.encoder_blocks)
    if device.type != "cpu":
        model.set_frozen_dtype(HALF_DTYPES.get(config.mixed_precision))
    model.to(device)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.unet.train()


def build_objective(objective_config):
    from ncppo.objectives import make_objective

    return make_objective(**objective_config.options())


def check_objective(model, objective, encoder_blocks=None) -> None:
    """``objective.validate(model)`` before training (a transformer's encoder depth and block indices against its
    blocks, the feature levels against the model) as a :class:`ConfigError`; ``encoder_blocks`` (the config's
    value) on a U-Net, which would ignore it, is refused."""
    from ncppo.errors import UsageError

    try:
        objective.validate(model)
    except UsageError as err:
        raise ConfigError(f"objective: {err} (model {model.kind})") from err
    if encoder_blocks is not None and objective.space.needs_frozen_unet and model.backbone.family == "unet":
        raise ConfigError(f"objective.encoder_blocks: {encoder_blocks!r} sets a transformer's encoder depth; this "
                          f"{model.kind} model is a U-Net, whose encoder is its down path (see objective.features)")


def build_data(data_config, model=None):
    """The run's :class:`~ncppo.training.sources.TrainingData`: the latent cache when ``data.cache`` is set,
    else the raw pairs of ``data.source``; a cache must have been built for ``model``'s kind."""
    from ncppo.training.sources import CacheData, PairsData

    if data_config.cache:
        from ncppo.data.cache import LatentCache

        check_local_path("data.cache", data_config.cache)
        data = CacheData(LatentCache(data_config.cache), source=data_config.cache)
        if model is not None:
            data.check_model(model)
        return data
    from ncppo.data.pairs import PreferencePairs

    check_local_path("data.source", data_config.source)
    if data_config.image_dir:
        check_local_path("data.image_dir", data_config.image_dir)
    pairs = PreferencePairs(data_config.source, tie_policy=data_config.tie_policy, image_dir=data_config.image_dir or None,
                            columns=data_config.columns if data_config.columns.given() else None)
    return PairsData(pairs, data_config.resolution,
                     random_crop=data_config.random_crop, random_flip=data_config.random_flip, source=data_config.source)


def build_optimizer(optim_config, params, lr: float):
    o = optim_config
    kwargs = dict(lr=lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay, eps=o.adam_epsilon)
    if o.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ConfigError("optim.optimizer: adamw8bit needs bitsandbytes (pip install bitsandbytes)") from err
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_scheduler(config, optimizer):
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.optim.lr_scheduler, optimizer, num_warmup_steps=config.optim.lr_warmup_steps,
                         num_training_steps=config.max_steps)


def calibrate(model, objective, batches, config, accelerator):
    """``objective.beta: auto``: measure beta on the first ``calibration_batches`` usable batches
    (:func:`ncppo.calibration.calibrate_beta`), the same on every process (their ratios are averaged) and
    on a resume (the batches and their noise are fixed by the seed). Returns the calibrated objective and
    the record (with ``batches``: how many were measured)."""
    from ncppo.calibration import calibrate_beta
    from ncppo.training.sources import CALIBRATION_STREAM

    measured, generators = [], []
    wanted = config.objective.calibration_batches
    for micro_index in range(wanted * 4):  # batches without a valid pair are skipped
        batch = batches(micro_index)
        if batch is not None:
            measured.append(batch)
            generators.append(batches.generator(micro_index, CALIBRATION_STREAM))
        if len(measured) == wanted:
            break

    def average(ratio: float) -> float:
        return float(accelerator.reduce(torch.tensor([ratio], device=accelerator.device), reduction="mean"))

    with accelerator.autocast():
        objective, record = calibrate_beta(model, objective, measured, generators, average=average)
    return objective, {**record, "batches": len(measured)}
