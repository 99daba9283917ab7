"""``benchmarks/toy_reproduction.py``'s bookkeeping: pooling counts (seed, prompt) units, the files are named by
backbone, and every committed seed record holds a whole seed (all fifteen models on the held-out test split)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("toy_reproduction", ROOT / "benchmarks" / "toy_reproduction.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)

SETTING = {"budget_dpo_steps": 60, "images_per_prompt": 8, "backbone": "unet"}


def test_pooling_counts_seed_prompt_units():
    def seed_result(rewards_a, rewards_b):
        prompts = list(range(len(rewards_a)))
        return {"comparisons": [{"a": "A", "b": "B", "kind": "vs base", "rate": 0.0}],
                "models": {"A": {"rewards": rewards_a, "prompt_ids": prompts},
                           "B": {"rewards": rewards_b, "prompt_ids": prompts}}}

    rows = bench.pooled([seed_result([0.1, 0.2], [0.3, 0.4]), seed_result([0.5, 0.6], [0.4, 0.7])])
    (row,) = rows
    assert (row["wins"], row["losses"], row["prompts"]) == (3, 1, 4)
    assert row["rate"] == pytest.approx(0.75)


def test_backbone_suffix_names_the_files():
    assert bench.backbone_suffix("unet") == "" and bench.backbone_suffix("dit") == "_dit"
    assert bench.seed_results_dir("dit").name == "toy_reproduction_dit_seeds"


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "results").glob("toy_reproduction*_seeds/seed-*.json")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_seed_records_are_whole(path):
    record = json.loads(path.read_text())
    assert set(record["setting"]) == set(SETTING)
    models = record["eval"]["models"]
    assert len(models) == 15 and "base" in models
    images = record["eval"]["spec"]["prompts"] * record["setting"]["images_per_prompt"]
    assert all(len(m["rewards"]) == images for m in models.values())
    assert record["eval"]["spec"]["split"] == "test"
