"""The toy world's stages, each reusing the previous one's output in one folder.

``pretrain`` (cached base model) -> ``pairs`` (Pick-a-Pic parquet from simulated annotators) ->
``filter`` (NCP absolute winners) -> ``train`` (methods x datasets at equal time budgets) -> ``evaluate``
(paired generation, oracle reward, curves) -> ``report``. A stage is skipped when its output exists and was
made from the same config sections (``stages.json`` records their fingerprints); ``force`` redoes it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ncppo.io import atomic_write_text
from ncppo.toy.config import ToyConfig

STAGES = ("pretrain", "pairs", "filter", "train", "evaluate", "report")
_INPUTS = {  # the config sections each stage's output depends on (its own and its inputs')
    "pretrain": ("pretrain",), "pairs": ("pretrain", "pairs"), "filter": ("pretrain", "pairs", "filter"),
    "train": ("pretrain", "pairs", "filter", "train"), "evaluate": ("pretrain", "pairs", "filter", "train", "eval"),
    "report": ("pretrain", "pairs", "filter", "train", "eval"),
}


def slug(name: str) -> str:
    """A dataset or run name as a file name: ``x>y,y>z`` -> ``x_gt_y+y_gt_z``."""
    return name.replace(">", "_gt_").replace(",", "+").replace("/", "-")


def _log(message: str) -> None:
    print(f"[toy] {message}", flush=True)


class ToyWorld:
    """One toy-world folder: ``ToyWorld(out_dir, config).run()`` plays every stage."""

    def __init__(self, out_dir: str | Path, config: ToyConfig | None = None, progress: bool = True):
        self.out = Path(out_dir)
        self.config = config or ToyConfig()
        self.progress = progress

    # -- bookkeeping -------------------------------------------------------------------------------
    def _ledger(self) -> dict:
        path = self.out / "stages.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _fresh(self, stage: str) -> bool:
        return self._ledger().get(stage, {}).get("fingerprint") == self.config.fingerprint(*_INPUTS[stage])

    def _done(self, stage: str, seconds: float, **record) -> None:
        ledger = self._ledger()
        ledger[stage] = {"fingerprint": self.config.fingerprint(*_INPUTS[stage]), "seconds": round(seconds, 2), **record}
        for later in STAGES[STAGES.index(stage) + 1:]:
            ledger.pop(later, None)  # its inputs just changed
        atomic_write_text(self.out / "stages.json", json.dumps(ledger, indent=2))

    def run(self, stages=STAGES, force: bool = False) -> Path:
        """Run ``stages`` in order (each skipped when fresh, unless ``force``); returns the report path."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "toy_config.json", json.dumps(self.config.to_dict(), indent=2))
        for stage in STAGES:
            if stage not in stages:
                continue
            if self._fresh(stage) and not force:
                _log(f"{stage}: up to date, reused")
                continue
            _log(f"{stage} ...")
            start = time.perf_counter()
            record = getattr(self, f"_stage_{stage}")() or {}
            self._done(stage, time.perf_counter() - start, **record)
            _log(f"{stage}: done in {time.perf_counter() - start:.0f} s")
        return self.out / "report.md"

    def _require(self, stage: str) -> None:
        if not self._fresh(stage):
            raise FileNotFoundError(f"{self.out}: stage {stage!r} has no up-to-date output; run `ncppo toy {stage}` "
                                    f"(or `ncppo toy all`) first")

    # -- stages ------------------------------------------------------------------------------------
    def base_model_path(self) -> Path:
        """``base_model/``: a link to the cached pretrained pipeline (what ``configs/toy/*.yaml`` train from)."""
        return self.out / "base_model"

    def _stage_pretrain(self) -> dict:
        from ncppo.toy.pretrain import base_model

        path = base_model(self.config.pretrain, progress=self.progress)
        record = json.loads((path / "pretrain.json").read_text())
        record.pop("losses", None)
        atomic_write_text(self.out / "base_model.json", json.dumps({"path": str(path), **record}, indent=2))
        link = self.out / ".tmp-base_model"
        link.unlink(missing_ok=True)
        link.symlink_to(path.resolve(), target_is_directory=True)
        os.replace(link, self.base_model_path())  # atomic: the link never points nowhere
        return {"cached_at": str(path)}

    def captions(self) -> list[str]:
        from ncppo.toy.world import all_scenes

        captions = [s.caption for s in all_scenes()]
        n = self.config.pairs.prompts
        if n is None or n >= len(captions):
            return captions
        keep = np.sort(np.random.default_rng(self.config.seed).choice(len(captions), size=n, replace=False))
        return [captions[i] for i in keep]

    def _stage_pairs(self) -> dict:
        from ncppo.data.filter import dataset_stats
        from ncppo.data.pairs import PreferencePairs
        from ncppo.models.loading import load_pipeline
        from ncppo.toy.annotators import build_pools, pipeline_generator, write_preference_dataset
        from ncppo.toy.oracle import OracleReward

        self._require("pretrain")
        cfg = self.config.pairs
        pipe = load_pipeline(self.base_model_path())
        pipe.set_progress_bar_config(disable=True)
        pools, images = build_pools(self.captions(), pipeline_generator(pipe, cfg.num_inference_steps), OracleReward(),
                                    images_per_prompt=cfg.images_per_prompt, guidance_scales=cfg.guidance_scales,
                                    seed=self.config.seed, progress=self.progress)
        path = write_preference_dataset(pools, images, self.out / "pairs", cfg.annotators)
        stats = dataset_stats(PreferencePairs(path, tie_policy="keep").meta)
        by_generator: dict[str, list[float]] = {}
        for pool in pools.values():
            for image in pool:
                by_generator.setdefault(image.generator, []).append(image.reward)
        stats["oracle_mean_by_generator"] = {g: float(np.mean(v)) for g, v in by_generator.items()}
        atomic_write_text(self.out / "pairs.json", json.dumps(stats, indent=2))
        return {}

    def _stage_filter(self) -> dict:
        from ncppo.data.writer import filter_dataset

        self._require("pairs")
        cfg = self.config.filter
        filter_dataset(self.out / "pairs", self.out / "filtered", min_wins=cfg.min_wins, pairs=cfg.pairs,
                       progress=self.progress)
        for variant in cfg.variants:
            filter_dataset(self.out / "pairs", self.dataset_path(variant), min_wins=cfg.min_wins, variant=variant,
                           progress=self.progress)
        return {}

    def dataset_path(self, name: str) -> Path:
        """``original`` (the pairs as annotated), ``filtered`` (absolute winners) or a Table-2 variant."""
        paths = {"original": self.out / "pairs", "filtered": self.out / "filtered"}
        paths.update({v: self.out / f"filtered-{slug(v)}" for v in self.config.filter.variants})
        if name not in paths:
            raise ValueError(f"unknown toy dataset {name!r}; expected one of {sorted(paths)} "
                             "(a Table-2 variant must be listed in filter.variants)")
        return paths[name]

    def run_dir(self, name: str) -> Path:
        """The folder of run ``dataset/method``."""
        dataset, method = name.rsplit("/", 1)
        return self.out / "runs" / slug(dataset) / method

    def _stage_train(self) -> dict:
        from ncppo.toy.training import train_method

        self._require("filter")
        cfg = self.config.train
        results = {}
        for name in cfg.run_names():
            dataset, method = name.rsplit("/", 1)
            result = train_method(cfg, method, self.dataset_path(dataset), self.base_model_path(),
                                  self.run_dir(name), self.config.pretrain.image_size)
            results[name] = {"steps": result.steps, "train_seconds": round(result.train_seconds, 2)}
            _log(f"trained {name}: {result.steps} steps in {result.train_seconds:.1f} s")
        return {"runs": results}

    def _stage_evaluate(self) -> dict:
        from ncppo.toy.evaluate import evaluate_world

        self._require("train")
        evaluate_world(self)
        return {}

    def _stage_report(self) -> dict:
        from ncppo.toy.report import write_report

        self._require("evaluate")
        write_report(self)
        return {}
