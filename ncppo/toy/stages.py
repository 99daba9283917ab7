"""The toy world's stages, each reusing the previous one's output in one folder.

``pretrain`` (cached base model) -> ``pairs`` (Pick-a-Pic parquet from simulated annotators) ->
``filter`` (NCP absolute winners) -> ``train`` (methods x datasets at equal compute) -> ``evaluate``
(paired generation, oracle reward, curves) -> ``report``. A stage is skipped when its output exists and was
made from the same config sections (``stages.json`` records their fingerprints); ``force`` redoes it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ncppo.errors import NcppoError, UsageError
from ncppo.io import atomic_write_text, guard_output_dir, mark_output_dir, read_json_object
from ncppo.toy.config import ToyConfig
from ncppo.toy.layout import ToyLayout, slug

__all__ = ["STAGES", "STAGE_TABLE", "MissingStageError", "Stage", "ToyWorld", "pair_captions", "slug"]


class MissingStageError(NcppoError, FileNotFoundError):
    """A stage needs an earlier stage's output that is missing or stale; the message says what to run."""


def _log(message: str) -> None:
    print(f"[toy] {message}", flush=True)


def pair_captions(config: ToyConfig) -> list[str]:
    """The captions the preference data is sampled for: the ``train`` split (:mod:`ncppo.toy.splits`), or
    ``pairs.prompts`` of them drawn with the world's seed."""
    from ncppo.toy.splits import split_captions

    captions = split_captions("train")
    n = config.pairs.prompts
    if n is None or n >= len(captions):
        return captions
    keep = np.sort(np.random.default_rng(config.seed).choice(len(captions), size=n, replace=False))
    return [captions[i] for i in keep]


def _pretrain(layout: ToyLayout, config: ToyConfig, progress: bool) -> dict:
    from ncppo.toy.pretrain import base_model

    path = base_model(config.pretrain, progress=progress)
    record = json.loads((path / "pretrain.json").read_text())
    record.pop("losses", None)
    atomic_write_text(layout.base_model_record, json.dumps({"path": str(path), **record}, indent=2))
    link = layout.root / ".tmp-base_model"
    link.unlink(missing_ok=True)
    link.symlink_to(path.resolve(), target_is_directory=True)
    os.replace(link, layout.base_model)  # atomic: the link never points nowhere
    return {"cached_at": str(path)}


def _pairs(layout: ToyLayout, config: ToyConfig, progress: bool) -> None:
    from ncppo.data.filter import dataset_stats
    from ncppo.data.pairs import PreferencePairs
    from ncppo.models.loading import load_pipeline
    from ncppo.toy.annotators import build_pools, pipeline_generator, write_preference_dataset
    from ncppo.toy.oracle import OracleReward

    cfg = config.pairs
    pipe = load_pipeline(layout.base_model)
    pipe.set_progress_bar_config(disable=True)
    pools, images = build_pools(pair_captions(config), pipeline_generator(pipe, cfg.num_inference_steps),
                                OracleReward(), images_per_prompt=cfg.images_per_prompt,
                                guidance_scales=cfg.guidance_scales, seed=config.seed, progress=progress,
                                image_format=cfg.image_format, rival=cfg.rival)
    path = write_preference_dataset(pools, images, layout.pairs, cfg.annotators)
    stats = dataset_stats(PreferencePairs(path, tie_policy="keep").meta)
    by_generator: dict[str, list[float]] = {}
    for pool in pools.values():
        for image in pool:
            by_generator.setdefault(image.generator, []).append(image.reward)
    stats["oracle_mean_by_generator"] = {g: float(np.mean(v)) for g, v in by_generator.items()}
    atomic_write_text(layout.pairs_stats, json.dumps(stats, indent=2))


def _filter(layout: ToyLayout, config: ToyConfig, progress: bool) -> None:
    from ncppo.data.writer import filter_dataset

    cfg = config.filter
    filter_dataset(layout.pairs, layout.filtered, min_wins=cfg.min_wins, pairs=cfg.pairs, progress=progress)
    for variant in cfg.variants:
        filter_dataset(layout.pairs, layout.dataset(variant), min_wins=cfg.min_wins, variant=variant,
                       progress=progress)


def _train(layout: ToyLayout, config: ToyConfig, progress: bool) -> dict:
    from ncppo.toy.budget import REFERENCE_METHOD, equal_compute_steps, method_flops
    from ncppo.toy.training import objective_values, train_method

    cfg = config.train
    names = cfg.run_names()
    methods = [name.rsplit("/", 1)[1] for name in names]
    flops = method_flops(methods, lambda m: objective_values(cfg, m), layout.base_model,
                         layout.dataset(names[0].rsplit("/", 1)[0]), cfg.batch_size, config.pretrain.image_size,
                         cfg.lora_rank)
    steps = equal_compute_steps(cfg.budget_dpo_steps, flops)
    _log(f"equal compute: {cfg.budget_dpo_steps} {REFERENCE_METHOD.upper()} steps = "
         f"{cfg.budget_dpo_steps * flops[REFERENCE_METHOD] / 1e9:.1f} GFLOP per run; steps "
         + ", ".join(f"{m} {steps[m]}" for m in dict.fromkeys(methods)))
    results = {}
    fingerprint = config.fingerprint("pretrain", "pairs", "filter", "train")
    for name, method in zip(names, methods):
        record_path = layout.run_record(name)
        done = read_json_object(record_path, "delete the run folder to retrain it") if record_path.is_file() else {}
        if done.get("fingerprint") == fingerprint and done.get("steps") == steps[method]:
            results[name] = {"steps": done["steps"], "train_seconds": done["train_seconds"]}
            _log(f"trained {name}: finished earlier ({done['steps']} steps), reused")
            continue  # an interrupted stage resumes run by run
        dataset = name.rsplit("/", 1)[0]
        result = train_method(cfg, method, layout.dataset(dataset), layout.base_model, layout.run_dir(name),
                              config.pretrain.image_size, steps[method])
        results[name] = {"steps": result.steps, "train_seconds": round(result.train_seconds, 2)}
        atomic_write_text(record_path, json.dumps({"fingerprint": fingerprint, **results[name]}))
        _log(f"trained {name}: {result.steps} steps in {result.train_seconds:.1f} s")
    atomic_write_text(layout.budget, json.dumps({"budget_dpo_steps": cfg.budget_dpo_steps, "reference": REFERENCE_METHOD,
                                                 "flops_per_step": flops, "steps": steps}, indent=2))
    return {"runs": results}


def _evaluate(layout: ToyLayout, config: ToyConfig, progress: bool) -> None:
    from ncppo.toy.evaluate import evaluate_world

    evaluate_world(layout, config, progress)


def _report(layout: ToyLayout, config: ToyConfig, progress: bool) -> None:
    from ncppo.toy.report import write_report

    write_report(layout, config)


@dataclass(frozen=True)
class Stage:
    """One stage: its name, the config sections its output depends on (its own and its inputs'), and
    ``run(layout, config, progress)``, which writes the output and returns what ``stages.json`` records."""

    name: str
    inputs: tuple[str, ...]
    run: Callable[[ToyLayout, ToyConfig, bool], dict | None]


STAGE_TABLE: tuple[Stage, ...] = (
    Stage("pretrain", ("pretrain",), _pretrain),
    Stage("pairs", ("pretrain", "pairs"), _pairs),
    Stage("filter", ("pretrain", "pairs", "filter"), _filter),
    Stage("train", ("pretrain", "pairs", "filter", "train"), _train),
    Stage("evaluate", ("pretrain", "pairs", "filter", "train", "eval"), _evaluate),
    Stage("report", ("pretrain", "pairs", "filter", "train", "eval"), _report),
)
STAGES = tuple(s.name for s in STAGE_TABLE)
_BY_NAME = {s.name: s for s in STAGE_TABLE}


class ToyWorld:
    """One toy-world folder: ``ToyWorld(out_dir, config).run()`` plays every stage (each needs the one before)."""

    def __init__(self, out_dir: str | Path, config: ToyConfig | None = None, progress: bool = True):
        self.out = Path(out_dir)
        self.config = config or ToyConfig()
        self.progress = progress
        self.layout = ToyLayout(self.out, self.config.filter.variants)

    # -- bookkeeping -------------------------------------------------------------------------------
    def _ledger(self) -> dict:
        path = self.layout.stages_file
        return read_json_object(path, "delete it to rerun every stage") if path.is_file() else {}

    def _fingerprint(self, stage: str) -> str:
        return self.config.fingerprint(*_BY_NAME[stage].inputs)

    def _fresh(self, stage: str) -> bool:
        return self._ledger().get(stage, {}).get("fingerprint") == self._fingerprint(stage)

    def _done(self, stage: str, seconds: float, **record) -> None:
        ledger = self._ledger()
        ledger[stage] = {"fingerprint": self._fingerprint(stage), "seconds": round(seconds, 2), **record}
        for later in STAGES[STAGES.index(stage) + 1:]:
            ledger.pop(later, None)  # its inputs just changed
        atomic_write_text(self.layout.stages_file, json.dumps(ledger, indent=2))

    def run(self, stages=STAGES, force: bool = False) -> Path:
        """Run ``stages`` in order (each skipped when fresh, unless ``force``); returns the report path."""
        unknown = [s for s in stages if s not in _BY_NAME]
        if unknown:
            raise UsageError(f"unknown toy stage(s) {unknown}; expected some of {', '.join(STAGES)}")
        # a folder that already holds a toy world (its config file) is this command's; any other non-empty
        # folder is refused, since the stages replace pairs/, eval/ and base_model there
        guard_output_dir(self.out, "toy", overwrite=self.layout.config_file.is_file() or self.layout.stages_file.is_file())
        self.out.mkdir(parents=True, exist_ok=True)
        mark_output_dir(self.out, "toy")
        atomic_write_text(self.layout.config_file, json.dumps(self.config.to_dict(), indent=2))
        for index, stage in enumerate(STAGE_TABLE):
            if stage.name not in stages:
                continue
            if self._fresh(stage.name) and not force:
                _log(f"{stage.name}: up to date, reused")
                continue
            if index:
                self._require(STAGE_TABLE[index - 1].name)
            _log(f"{stage.name} ...")
            start = time.perf_counter()
            record = stage.run(self.layout, self.config, self.progress) or {}
            self._done(stage.name, time.perf_counter() - start, **record)
            _log(f"{stage.name}: done in {time.perf_counter() - start:.0f} s")
        return self.layout.report

    def _require(self, stage: str) -> None:
        if not self._fresh(stage):
            raise MissingStageError(f"{self.out}: stage {stage!r} has no up-to-date output; run `ncppo toy {stage}` "
                                    f"(or `ncppo toy all`) first")

    # -- paths (see ToyLayout) ---------------------------------------------------------------------
    def base_model_path(self) -> Path:
        """``base_model/``: a link to the cached pretrained pipeline (what ``configs/toy/*.yaml`` train from)."""
        return self.layout.base_model

    def captions(self) -> list[str]:
        """The captions of the preference data (see :func:`pair_captions`)."""
        return pair_captions(self.config)

    def dataset_path(self, name: str) -> Path:
        """``original`` (the pairs as annotated), ``filtered`` (absolute winners) or a Table-2 variant."""
        return self.layout.dataset(name)

    def run_dir(self, name: str) -> Path:
        """The folder of run ``dataset/method``."""
        return self.layout.run_dir(name)
