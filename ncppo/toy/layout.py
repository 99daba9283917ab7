"""Where a toy world keeps its files: one typed object for every path the stages write and read.

::

    OUT/toy_config.json  stages.json                      the config as run; each stage's fingerprint
    OUT/base_model -> $NCPPO_CACHE/toy-base-...  base_model.json
    OUT/pairs/  pairs.json                                the annotated pairs (Pick-a-Pic v2 schema)
    OUT/filtered/  OUT/filtered-x_gt_y+x_gt_z/ ...        the NCP filter and Table 2's variants
    OUT/budget.json  OUT/runs/<dataset>/<method>/         equal compute; ``ncppo train`` outputs
    OUT/eval/results.json  OUT/eval/images/<run>.npz      the evaluation
    OUT/eval-partial/<run>.json  <run>.npz                models evaluated so far (an interrupted stage resumes)
    OUT/figures/*.png  OUT/report.md                      the report
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ncppo.errors import UsageError


def slug(name: str) -> str:
    """A dataset or run name as a file name: ``x>y,y>z`` -> ``x_gt_y+y_gt_z``."""
    return name.replace(">", "_gt_").replace(",", "+").replace("/", "-")


@dataclass(frozen=True)
class ToyLayout:
    """The paths of one toy-world folder ``root``; ``variants`` are the Table-2 datasets it filters."""

    root: Path
    variants: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config_file(self) -> Path:
        return self.root / "toy_config.json"

    @property
    def stages_file(self) -> Path:
        return self.root / "stages.json"

    @property
    def base_model(self) -> Path:
        """``base_model/``: a link to the cached pretrained pipeline (what ``configs/toy/*.yaml`` train from)."""
        return self.root / "base_model"

    @property
    def base_model_record(self) -> Path:
        return self.root / "base_model.json"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs"

    @property
    def pairs_stats(self) -> Path:
        return self.root / "pairs.json"

    @property
    def filtered(self) -> Path:
        return self.root / "filtered"

    def datasets(self) -> dict[str, Path]:
        """Every dataset by name: ``original`` (the pairs as annotated), ``filtered``, the variants."""
        paths = {"original": self.pairs, "filtered": self.filtered}
        paths.update({v: self.root / f"filtered-{slug(v)}" for v in self.variants})
        return paths

    def dataset(self, name: str) -> Path:
        """``original`` (the pairs as annotated), ``filtered`` (absolute winners) or a Table-2 variant."""
        paths = self.datasets()
        if name not in paths:
            raise UsageError(f"unknown toy dataset {name!r}; expected one of {sorted(paths)} "
                             "(a Table-2 variant must be listed in filter.variants)")
        return paths[name]

    @property
    def budget(self) -> Path:
        """``budget.json``: FLOPs per step of each method and the steps the equal-compute budget gave it."""
        return self.root / "budget.json"

    def run_dir(self, name: str) -> Path:
        """The folder of run ``dataset/method``."""
        dataset, method = name.rsplit("/", 1)
        return self.root / "runs" / slug(dataset) / method

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def eval_partial(self) -> Path:
        """``eval-partial/``: each model's evaluation as soon as it is done, removed when the stage completes."""
        return self.root / "eval-partial"

    def run_record(self, name: str) -> Path:
        """``runs/<dataset>/<method>/toy_run.json``: a finished run's fingerprint and steps (reused on resume)."""
        return self.run_dir(name) / "toy_run.json"

    @property
    def results(self) -> Path:
        """``eval/results.json``: every number the report states."""
        return self.eval_dir / "results.json"

    def eval_images(self, name: str, eval_dir: Path | None = None) -> Path:
        """The samples of model ``name`` (``base`` or a run), for the report's grid."""
        return (eval_dir or self.eval_dir) / "images" / f"{slug(name)}.npz"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def report(self) -> Path:
        return self.root / "report.md"
