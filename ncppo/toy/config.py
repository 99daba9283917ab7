"""The toy world's configuration: one dataclass per stage, gathered in ``ToyConfig`` (YAML-able)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from ncppo.objectives import OBJECTIVE_NAMES
from ncppo.toy.annotators import AnnotatorConfig
from ncppo.toy.pretrain import QUICK, PretrainConfig


@dataclass(frozen=True)
class PairsConfig:
    images_per_prompt: int = 4
    guidance_scales: tuple[float, ...] = (3.0, 1.5)  # two "generators", as Pick-a-Pic mixes models
    num_inference_steps: int = 10
    prompts: int | None = None  # None: every caption of the world (168)
    annotators: AnnotatorConfig = AnnotatorConfig()


@dataclass(frozen=True)
class FilterConfig:
    min_wins: int = 2
    pairs: str = "latest"
    variants: tuple[str, ...] = ()  # Table 2's "x>y", "x>y,x>z", "x>y,y>z": each a dataset to train on too


@dataclass(frozen=True)
class TrainStageConfig:
    methods: tuple[str, ...] = OBJECTIVE_NAMES
    datasets: tuple[str, ...] = ("filtered",)  # "original" (ties dropped), "filtered", filter.variants
    extra_runs: tuple[str, ...] = ()  # more "dataset/method" runs, e.g. "x>y,y>z/ncp-dpo" for Table 2
    minutes_per_run: float = 0.5  # equal time budgets: every run trains for this long
    max_steps: int = 100_000  # a cap; the time budget normally stops a run first
    checkpoints_per_run: int = 3  # evenly spaced in training time: the reward-vs-time curve's points
    batch_size: int = 8
    lora_rank: int = 8
    learning_rate: float = 2e-4  # one lr for every method; 1e-3 made NCP-DPO and SFT worse than the base
    beta_noise: float = 5000.0  # METHOD.md's convention and default
    beta_perceptual: float = 5000.0
    seed: int = 0


    def run_names(self) -> list[str]:
        """Every run, as ``dataset/method``: datasets x methods, then the extra runs."""
        names = [f"{d}/{m}" for d in self.datasets for m in self.methods]
        return names + [r for r in self.extra_runs if r not in names]


@dataclass(frozen=True)
class EvalConfig:
    images_per_prompt: int = 1  # with seeds the pair generator never used
    prompts: int | None = None  # None: every caption of the world (168); else that many, evenly spaced
    curve_prompt_stride: int = 3  # intermediate checkpoints are scored on every 3rd caption
    num_inference_steps: int = 10
    guidance_scale: float = 3.0
    seed: int = 777
    batch_size: int = 56
    bootstrap: int = 2000


@dataclass(frozen=True)
class ToyConfig:
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
        payload = json.dumps({s: self.to_dict()[s] for s in sections} | {"seed": self.seed}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


# every stage at a tiny size: a smoke test of the whole story (about 2 minutes on 2 CPU cores)
QUICK_CONFIG = ToyConfig(
    pretrain=QUICK,
    # the quick base model barely follows captions: a finer tie margin keeps enough decided pairs
    pairs=PairsConfig(images_per_prompt=3, num_inference_steps=4, prompts=32,
                      annotators=AnnotatorConfig(comparisons_per_prompt=6, tie_margin=0.001)),
    filter=FilterConfig(min_wins=1),
    train=TrainStageConfig(minutes_per_run=0.05, max_steps=6, checkpoints_per_run=2, batch_size=2, lora_rank=4),
    eval=EvalConfig(prompts=48, num_inference_steps=4, curve_prompt_stride=4, batch_size=48, bootstrap=500),
)


def _build(cls, data: dict, where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; expected {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            value = _build(type(default), value or {}, f"{where}.{key}")
        elif isinstance(default, tuple):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def toy_config_from_dict(data: dict, base: ToyConfig = ToyConfig()) -> ToyConfig:
    """``base`` updated by a nested dict (from YAML); unknown keys raise with the valid ones."""
    merged = base.to_dict()

    def merge(into: dict, new: dict):
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(merged, data)
    return _build(ToyConfig, merged, "toy config")
