"""The training options: one dataclass per config section (``model``, ``data``, ``objective``, ``optim``)
gathered in :class:`TrainConfig`, each option declared and documented once, where it is declared. Loading
them from YAML and overrides, and checking them together, is :mod:`ncppo.training.config`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ncppo.configuration import ConfigError
from ncppo.data.formats import ColumnMapping


@dataclass
class ModelConfig:
    """The model to train (section ``model``).

    Parameters:
        pretrained: the diffusers pipeline folder to train (SD1.5, SDXL, SD3, FLUX.1, PixArt-Sigma), or a hub id.
        finetune: ``lora`` (peft adapters on the U-Net; the frozen base is the reference) or ``full`` (the
            whole U-Net, with a frozen copy as the reference).
        lora_rank: the LoRA rank (the paper: 64).
        lora_alpha: the LoRA alpha; the adapters are scaled by ``alpha / rank`` (``null``: alpha = rank).
        lora_targets: the U-Net modules that get adapters (peft ``target_modules``; one name or a
            comma-separated string is read as a list). On an MMDiT (SD3, FLUX) each attention projection's
            text-stream twin (``add_q_proj``...) is adapted too.
        guidance: the guidance scale a FLUX.1-dev-class transformer (with a guidance embedding) trains with
            (``null``: 3.5, diffusers' FLUX.1-dev LoRA scripts'); other models refuse a value.
        timestep_weighting: a flow model's (SD3, FLUX) training sigmas: ``logit_normal`` (SD3's) or ``uniform``
            (``null``: logit_normal); DDPM models (SD1.5, SDXL, PixArt: ``t`` uniform) refuse a value.
        reference_pass: how DPO-family objectives get the reference's prediction with the policy's:
            ``difference`` (LoRA only) runs one pass carrying the reference's activations and the policy's
            difference from them, which keeps DPO's argument and gradient in bf16 (NCP-DPO's cosine with float32
            >= 0.998 where two separate passes give 0.75-0.86: ``benchmarks/precision_floor.py``) for about 1.3-1.4x
            the FLOPs; ``separate`` runs the reference as a pass of its own; ``auto``: difference for a LoRA in bf16,
            separate otherwise (fp16 and float32 are sound with separate passes).
    """

    pretrained: str = ""
    finetune: str = "lora"
    lora_rank: int = 64
    lora_alpha: float | None = None
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    guidance: float | None = None
    timestep_weighting: str | None = None
    reference_pass: str = "auto"


@dataclass
class DataConfig:
    """The preference pairs (section ``data``).

    Parameters:
        source: raw pairs: a Pick-a-Pic parquet folder, a ``save_to_disk`` folder, a ``.csv`` or a hub id.
        cache: a latent cache folder (``ncppo data cache``); used instead of ``source`` when set.
        resolution: the training resolution in pixels (images are resized and cropped to it).
        tie_policy: what to do with tied pairs: ``drop``, ``keep`` (only objectives that can use ties)
            or ``error``.
        random_crop: crop at a random place instead of the centre.
        random_flip: flip half the pairs horizontally (both images of a pair alike).
        prompt_dropout: the fraction of prompts replaced by the empty prompt (Diffusion-DPO: 0.2 for SDXL).
        columns: which column of ``source`` plays which part, for a source in another shape (the same roles
            as ``ncppo data filter --caption-column`` and the like: ``caption``, ``image_0``, ``image_1``,
            ``label_0``, ``label_1``, ``uid_0``, ``uid_1``, or TRL-style ``chosen``/``rejected``).
        image_dir: the folder that relative image paths in ``source`` are read from (default: beside it).
    """

    source: str = ""
    cache: str = ""
    resolution: int = 512
    tie_policy: str = "drop"
    random_crop: bool = False
    random_flip: bool = False
    prompt_dropout: float = 0.0
    columns: ColumnMapping = field(default_factory=ColumnMapping)
    image_dir: str = ""


@dataclass
class ObjectiveConfig:
    """The training objective; every field is passed to :func:`ncppo.objectives.make_objective`, which
    owns the choices and checks them (see its docstring for the meaning of each option).

    Parameters:
        name: one of ``sft, dpo, cpo, ncp-sft, ncp-dpo, ncp-cpo``.
        beta: the DPO/CPO temperature in METHOD.md's convention (``null``: 5000), or ``auto`` (NCP only):
            calibrated on the first ``calibration_batches`` batches so that the perceptual argument sits
            on noise-space DPO's scale at beta 5000; the value is logged and written to ``resolved``.
        cpo_lambda: weight of CPO's behaviour-cloning term (0 reproduces the authors' code).
        features: NCP feature levels: ``last``, ``mid``, ``last+mid``, ``all``, ``all+mid``.
        level_weights: one non-negative weight per feature level (``null``: equal).
        level_norm: per-level normalisation: ``none`` (paper), ``channels`` (the authors' rescale by
            ``C_last / C_level``), ``target`` (per channel by the target features' spread).
        encoder_timestep: ``t-1`` (paper), ``t-k`` (k exact posterior steps), ``uniform``.
        scale: ``noise`` (default: PL divided by the squared gain of the step from ``x_t`` to the encoder's
            input, on the noise MSE's scale, so beta 5000 puts the argument near noise-space DPO's) or
            ``paper`` (PL as the paper writes it, about 1e-5 of the noise MSE: the loss then sits at log 2).
        distance: ``exact`` (the paper's difference of two encoder passes), ``linear`` (the first-order
            form ``J_f(x*) (x - x*)`` as a JVP: keeps its signal in half precision), or ``auto`` (exact in
            float32, linear in half precision).
        encoder_dtype: ``model`` (the encoder runs in the training precision) or ``fp32``.
        encoder_blocks: a transformer's encoder depth (SD3, FLUX, PixArt): a fraction in (0, 1] of its blocks,
            a block count, or a list of block indices (FLUX: double-stream blocks first); ``null``: half. A
            U-Net (encoder: its down path) refuses a value; checked against the model before training.
        calibration_batches: batches measured for ``beta: auto``.
    """

    name: str = "ncp-dpo"
    beta: float | str | None = None
    cpo_lambda: float = 1.0
    features: str = "last"
    level_weights: list[float] | None = None
    level_norm: str = "none"
    encoder_timestep: str = "t-1"
    scale: str = "noise"
    distance: str = "auto"
    encoder_dtype: str = "model"
    encoder_blocks: int | float | list[int] | None = None  # int first: a count is not read as the fraction 3.0
    calibration_batches: int = 4

    def options(self) -> dict:
        """Keyword arguments of :func:`ncppo.objectives.make_objective`."""
        values = dataclasses.asdict(self)
        values.pop("calibration_batches")
        for key in ("level_weights", "encoder_blocks"):
            if isinstance(values[key], list):
                values[key] = tuple(values[key])
        return values


@dataclass
class OptimConfig:
    """The optimiser and the learning-rate schedule (section ``optim``).

    Parameters:
        optimizer: ``adamw`` (torch) or ``adamw8bit`` (bitsandbytes).
        learning_rate: the base learning rate; with ``scale_lr`` the run trains at this times the
            effective batch (the value used is printed at start and written to ``config.yaml``'s ``resolved``).
        scale_lr: multiply the learning rate by the effective batch in pairs, as Diffusion-DPO (1e-8 x 2048).
        weight_decay: AdamW's decoupled weight decay.
        adam_beta1: AdamW's first-moment decay.
        adam_beta2: AdamW's second-moment decay.
        adam_epsilon: AdamW's epsilon (updates whose gradient scale is below it are set by it; see
            ``diagnostics_window``).
        max_grad_norm: clip the total gradient norm to this.
        lr_scheduler: any ``diffusers.optimization`` scheduler name (``constant``, ``constant_with_warmup``,
            ``linear``, ``cosine``...).
        lr_warmup_steps: optimiser steps of linear warm-up.
    """

    optimizer: str = "adamw"
    learning_rate: float = 1e-8
    scale_lr: bool = True
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0


@dataclass
class TrainConfig:
    """One training run (see the README's "Training"); the sections are :class:`ModelConfig`,
    :class:`DataConfig`, :class:`ObjectiveConfig` and :class:`OptimConfig`.

    Run:
        output_dir: the run's folder: ``config.yaml`` (the settings with absolute paths, which
            :func:`load_config` reloads, plus the ``resolved`` values and the ``provenance``: versions, git
            commit, machine), metrics, ``checkpoints/``, ``lora/``, ``README.md`` (the model card),
            ``summary.json``.
        seed: the seed of everything random (the LoRA's initial weights, data order, noise, dropout).

    Batches and budget:
        batch_size: pairs per process per micro-step.
        gradient_accumulation_steps: micro-steps per optimiser step.
        effective_batch: pairs per optimiser step over all processes; sets ``gradient_accumulation_steps``
            (``null``: not used).
        max_steps: stop after this many optimiser steps.
        max_train_minutes: stop after this much training time (equal-compute comparisons; ``null``: none).

    Precision:
        mixed_precision: ``no``, ``fp16`` or ``bf16`` (on GPU the frozen weights are kept in half
            precision, the LoRA in float32). YAML reads a bare ``no`` as false: that means ``no`` too.
        gradient_checkpointing: recompute activations in the backward pass (less memory, slower).

    Checkpoints:
        checkpoint_every_steps: write a checkpoint every this many optimiser steps (``null``: only at the
            end; there is always one at the end). The default, 500, is diffusers' training scripts'
            ``--checkpointing_steps``: a kill loses at most 500 steps (about a quarter of the paper's 2000)
            while a checkpoint (the LoRA, AdamW's two moments and the schedule: a few times the LoRA's size)
            costs little next to 500 steps. Each checkpoint ``checkpoints/step-N/`` is accelerate's
            ``save_state`` (the optimiser's state sharded as DeepSpeed/FSDP shard it) plus the trained tensors
            and a LoRA in diffusers format (``pipe.load_lora_weights``, ``ncppo generate --lora``).
        checkpoint_every_minutes: write a checkpoint every this many minutes of training (``null``: none).
        keep_last_checkpoints: the newest checkpoints kept; older ones are deleted.

    Output folder and resume:
        resume: ``true`` (default) continues from the newest complete checkpoint in ``output_dir``;
            the checkpoint's run must have the same settings, except the keys in
            :data:`CHANGEABLE_ON_RESUME` (the budget ``max_steps`` / ``max_train_minutes``, logging,
            validation, checkpoint intervals, guards and diagnostics, ``gradient_checkpointing``,
            ``output_dir`` itself); any other difference (``objective.beta``, ``optim.learning_rate``,
            ``model.lora_rank``, the data, the resolved learning rate or effective batch...) is refused
            with the differing keys named. ``force`` continues anyway (the differences are printed and
            recorded in ``summary.json``'s ``warnings``). ``false`` never resumes: the folder must be
            empty or new. With a decaying ``optim.lr_scheduler``, a new ``max_steps`` stretches the
            schedule from the resumed step on.
        overwrite_output_dir: replace whatever ``output_dir`` holds (the old folder is moved aside in
            one rename, then deleted) and start a new run. Without it a non-empty folder that is not an
            ``ncppo train`` run is refused, and so is a run's folder with ``resume: false``.
            ``output_dir`` equal to, inside or around ``data.source``, ``data.cache`` or
            ``model.pretrained`` is always refused.

    Logging and trackers:
        log_every: log the metrics every this many optimiser steps.
        report_to: where the metrics go: ``jsonl`` and ``csv`` (files in ``output_dir``), ``tensorboard``
            and ``wandb`` (through accelerate's trackers; install ``ncppo[tensorboard]`` or ``ncppo[wandb]``).
            One name or a comma-separated string is read as a list.
        tracker_project: the project name for the trackers (W&B project; TensorBoard logs go to
            ``output_dir/tensorboard/PROJECT``).
        run_name: the run's name for the trackers and the exported files (``null``: the name of
            ``output_dir``).

    Validation:
        validation_every: sample ``validation_prompts`` every this many steps into ``validation/`` and the
            trackers (``null``: only at the end, when there are prompts).
        validation_prompts: prompts sampled for validation (one image each, seed = its index); at the end
            also without the LoRA, as a comparison grid (``validation/comparison.png``).
        validation_steps: sampling steps for validation images.

    Guards and diagnostics:
        max_nonfinite_in_a_row: the NaN/inf guard: a non-finite loss or gradient skips the step; the run
            stops after this many in a row.
        max_skipped_step_fraction: stop (with the data's skip report) once more than this share of the
            optimiser steps had no valid pair (all their images failed to decode), checked from step
            ``skipped_step_check_after`` on and at the end of the run; ``null`` disables it.
        skipped_step_check_after: the first step at which ``max_skipped_step_fraction`` is checked.
        diagnostics_window: consecutive logged steps before a diagnostic warning: ``argument_rms``
            below 1e-3 (the loss sits at log 2) or ``eps_dominated_frac`` above 0.5 (most Adam updates
            are below ``optim.adam_epsilon``).
    """

    output_dir: str = "outputs/run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    effective_batch: int | None = None
    max_steps: int = 2000
    max_train_minutes: float | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpoint_every_steps: int | None = 500
    checkpoint_every_minutes: float | None = None
    keep_last_checkpoints: int = 3
    resume: bool | str = True
    overwrite_output_dir: bool = False
    log_every: int = 1
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "csv"])
    tracker_project: str = "ncppo"
    run_name: str | None = None
    validation_every: int | None = None
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 20
    max_nonfinite_in_a_row: int = 5
    max_skipped_step_fraction: float | None = 0.1
    skipped_step_check_after: int = 10
    diagnostics_window: int = 20

    def resolved_accumulation(self, num_processes: int) -> int:
        """Gradient accumulation steps, from ``effective_batch`` when it is set."""
        if self.effective_batch is None:
            return self.gradient_accumulation_steps
        per_step = self.batch_size * num_processes
        if self.effective_batch % per_step:
            raise ConfigError(
                f"effective_batch={self.effective_batch} is not a multiple of batch_size x processes = "
                f"{self.batch_size} x {num_processes} = {per_step}")
        return self.effective_batch // per_step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
