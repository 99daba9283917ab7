"""The toy world's configuration: one dataclass per stage, gathered in ``ToyConfig`` (YAML-able)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ncppo.configuration import ConfigError, check_choice, parse_overrides, read_mapping, updated
from ncppo.data.filter import PAIR_CHOICES, VARIANTS
from ncppo.data.pickapic import IMAGE_ENCODINGS
from ncppo.objectives import OBJECTIVE_NAMES
from ncppo.toy.annotators import AnnotatorConfig
from ncppo.toy.pretrain import BACKBONES, QUICK, PretrainConfig
from ncppo.toy.rival import RivalConfig


@dataclass(frozen=True)
class PairsConfig:
    """The ``pairs`` stage: Pick-a-Pic-format preference data from simulated annotators.

    Parameters:
        images_per_prompt: images sampled per caption, split over the generators.
        guidance_scales: one guidance scale per "generator" (Pick-a-Pic mixes models).
        num_inference_steps: DDIM steps per sample.
        prompts: how many captions (``None``: every caption of the ``train`` split, 56; see
            :mod:`ncppo.toy.splits`), drawn with the world's seed.
        annotators: the simulated annotators (:class:`ncppo.toy.annotators.AnnotatorConfig`).
        rival: a second model in the pools (:class:`ncppo.toy.rival.RivalConfig`; its ``images_per_prompt``
            0 leaves the pools to the base model alone).
        image_format: how the pool's images are stored in the ``jpg_0``/``jpg_1`` columns: ``png``
            (lossless: the pixels the oracle judged are the pixels trained on) or ``jpeg`` (Pick-a-Pic's
            format; at 32 px its 4:2:0 chroma subsampling smears the object's colour, costing 0.28 of the
            oracle's object-colour score, so SFT on it learned the artefacts and fell below the base model).
    """

    images_per_prompt: int = 6
    guidance_scales: tuple[float, ...] = (3.0, 1.5)
    num_inference_steps: int = 10
    prompts: int | None = None
    annotators: AnnotatorConfig = AnnotatorConfig()
    rival: RivalConfig = RivalConfig()
    image_format: str = "png"


@dataclass(frozen=True)
class FilterConfig:
    """The ``filter`` stage: NCP absolute winners (``ncppo data filter``).

    Parameters:
        min_wins: wins an absolute winner needs (no losses, no draws).
        pairs: which pair is kept per absolute winner: ``latest``, ``first`` or ``all``.
        variants: Table 2's ``x>y``, ``x>y,x>z``, ``x>y,y>z``: each also a dataset to train on.
    """

    min_wins: int = 2
    pairs: str = "latest"
    variants: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainStageConfig:
    """The ``train`` stage: every run through ``ncppo.training.Trainer`` with the same compute, data and optimiser.

    Parameters:
        methods: the objectives to train (``ncppo objectives``).
        datasets: ``original`` (ties dropped), ``filtered`` and/or a ``filter.variants`` entry.
        extra_runs: more ``dataset/method`` runs, e.g. ``x>y,y>z/ncp-dpo`` for Table 2.
        budget_dpo_steps: the equal-compute budget of every run, in steps of noise-space DPO: a run gets
            ``round(budget * FLOPs(DPO step) / FLOPs(its step))`` steps, FLOPs counted by
            ``torch.utils.flop_counter`` on the run's first batch (:mod:`ncppo.toy.budget`). The paper's
            equal-compute idea in a unit that does not drift with the machine's speed or load (a wall-clock
            budget gave DPO 34 steps on one machine and 84 on another); wall time is recorded beside it.
        checkpoints_per_run: checkpoints evenly spaced in steps (the curve's points).
        batch_size: pairs per step.
        lora_rank: LoRA rank.
        learning_rate: one learning rate for every method (1e-3 made NCP-DPO and SFT worse than the base).
        beta_noise: beta of the noise-space objectives (METHOD.md's convention and default).
        beta_perceptual: beta of the NCP objectives (a number, or ``auto``: calibrated per run, see
            ``ncppo.calibration``; SFT has none).
        perceptual_scale: the NCP objectives' ``objective.scale``: ``paper`` (PL as the paper writes it) or
            ``noise`` (PL divided by the reverse step's squared gain).
        seed: the trainer's seed.
    """

    methods: tuple[str, ...] = OBJECTIVE_NAMES
    datasets: tuple[str, ...] = ("filtered",)
    extra_runs: tuple[str, ...] = ()
    budget_dpo_steps: int = 60
    checkpoints_per_run: int = 3
    batch_size: int = 8
    lora_rank: int = 8
    learning_rate: float = 2e-4
    beta_noise: float = 5000.0
    beta_perceptual: float | str = 5000.0
    perceptual_scale: str = "noise"
    seed: int = 0

    def run_names(self) -> list[str]:
        """Every run, as ``dataset/method``: datasets x methods, then the extra runs."""
        names = [f"{d}/{m}" for d in self.datasets for m in self.methods]
        return names + [r for r in self.extra_runs if r not in names]


@dataclass(frozen=True)
class EvalConfig:
    """The ``evaluate`` stage: paired samples scored by the oracle.

    Parameters:
        split: the captions evaluated: ``test`` (the reported numbers) or ``validation`` (for choosing
            settings); see :mod:`ncppo.toy.splits`. The base model is also scored on the other one.
        images_per_prompt: images per caption, from seeds the pair generator never used.
        prompts: how many captions of the split (``None``: all 56; else that many, evenly spaced).
        curve_prompt_stride: intermediate checkpoints are scored on every ``stride``-th caption.
        num_inference_steps: DDIM steps per sample.
        guidance_scale: classifier-free guidance.
        seed: the evaluation seed (seeds per (prompt, image) derive from it).
        batch_size: images per pipeline call.
        bootstrap: bootstrap resamples of the win-rate intervals.
    """

    split: str = "test"
    images_per_prompt: int = 1
    prompts: int | None = None
    curve_prompt_stride: int = 3
    num_inference_steps: int = 10
    guidance_scale: float = 3.0
    seed: int = 777
    batch_size: int = 56
    bootstrap: int = 2000


@dataclass(frozen=True)
class ToyConfig:
    """The toy world's whole configuration, one section per stage (``configs/world/toy.yaml`` mirrors it).

    Parameters:
        pretrain: the base model (:class:`ncppo.toy.pretrain.PretrainConfig`).
        pairs: the preference data (:class:`PairsConfig`).
        filter: the NCP filter (:class:`FilterConfig`).
        train: the training runs (:class:`TrainStageConfig`).
        eval: the evaluation (:class:`EvalConfig`).
        seed: the world's seed (captions, image pools).
    """

    pretrain: PretrainConfig = PretrainConfig()
    pairs: PairsConfig = PairsConfig()
    filter: FilterConfig = FilterConfig()
    train: TrainStageConfig = TrainStageConfig()
    eval: EvalConfig = EvalConfig()
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, *sections: str) -> str:
        """A hash of the named sections: a stage's output is reused while its inputs' sections are unchanged."""
        values = self.to_dict() | {"pretrain": self.pretrain.identity()}
        payload = json.dumps({s: values[s] for s in sections} | {"seed": self.seed}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


# every stage at a tiny size: a smoke test of the whole story (about 2 minutes on 2 CPU cores)
QUICK_CONFIG = ToyConfig(
    pretrain=QUICK,
    # the quick base model barely follows captions: a finer tie margin keeps enough decided pairs
    pairs=PairsConfig(images_per_prompt=3, num_inference_steps=4, prompts=32,
                      annotators=AnnotatorConfig(comparisons_per_prompt=6, tie_margin=0.001)),
    filter=FilterConfig(min_wins=1),
    train=TrainStageConfig(budget_dpo_steps=4, checkpoints_per_run=2, batch_size=2, lora_rank=4),
    eval=EvalConfig(prompts=24, images_per_prompt=2, num_inference_steps=4, curve_prompt_stride=4, batch_size=48, bootstrap=500),
)


def toy_config_from_dict(data: dict, base: ToyConfig = ToyConfig()) -> ToyConfig:
    """``base`` updated by a nested dict (from YAML), type-checked: an unknown key or a wrong type is a
    :class:`~ncppo.configuration.ConfigError` naming the key (``toy config.train.budget_dpo_steps: ...``)."""
    config = updated(base, data, "toy config")
    choices = {"train.methods": (config.train.methods, OBJECTIVE_NAMES),
               "filter.pairs": ((config.filter.pairs,), PAIR_CHOICES), "filter.variants": (config.filter.variants, VARIANTS),
               "eval.split": ((config.eval.split,), ("validation", "test")),
               "pairs.image_format": ((config.pairs.image_format,), IMAGE_ENCODINGS),
               "pretrain.backbone": ((config.pretrain.backbone,), BACKBONES)}
    for key, (values, allowed) in choices.items():
        for value in values:
            check_choice(value, allowed, f"toy config.{key}")
    from ncppo.objectives import make_objective

    try:  # the objectives' module owns the perceptual options
        make_objective("ncp-dpo", beta=config.train.beta_perceptual, scale=config.train.perceptual_scale)
    except ValueError as err:
        raise ConfigError(f"toy config.train (beta_perceptual / perceptual_scale): {err}") from err
    for key in _POSITIVE:
        section, leaf = key.split(".")
        value = getattr(getattr(config, section), leaf)
        if value is not None and value <= 0:
            raise ConfigError(f"toy config.{key}: must be > 0, got {value}")
    return config


_POSITIVE = ("pretrain.image_size", "pretrain.steps", "pretrain.batch_size", "pretrain.dit_layers", "pretrain.dit_width",
             "pretrain.dit_heads", "pairs.images_per_prompt",
             "pairs.num_inference_steps", "pairs.prompts", "filter.min_wins", "train.budget_dpo_steps",
             "train.checkpoints_per_run", "train.batch_size", "train.lora_rank", "eval.images_per_prompt", "eval.prompts",
             "eval.curve_prompt_stride", "eval.num_inference_steps", "eval.batch_size", "eval.bootstrap")


def load_toy_config(path: str | Path | None = None, overrides: list[str] | None = None,
                    quick: bool = False) -> ToyConfig:
    """The defaults (or ``--quick``'s), then a YAML file, then ``section.key=value`` overrides."""
    config = QUICK_CONFIG if quick else ToyConfig()
    if path:
        config = toy_config_from_dict(read_mapping(path, "a toy-world config"), config)
    if overrides:
        config = toy_config_from_dict(parse_overrides(overrides), config)
    return config
