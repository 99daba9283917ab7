"""Guards ``benchmarks/results/precision_floor.json`` and what the configs took from it: DPO-family gradients
are sound in fp16 at every policy-reference distance, not in bf16 (for noise-space DPO as for NCP-DPO), so the
SD1.5 and SDXL configs train in fp16."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows():
    record = json.loads((ROOT / "benchmarks" / "results" / "precision_floor.json").read_text())
    return {(r["kind"], r["precision"], r["objective"], r["lora_b_scale"]): r for r in record["rows"]}


def test_every_cell_was_measured(rows):
    kinds, precisions = {k[0] for k in rows}, {k[1] for k in rows}
    objectives, scales = {k[2] for k in rows}, {k[3] for k in rows}
    assert kinds == {"sd15", "sdxl"} and precisions == {"bf16", "fp16"} and len(objectives) == 2
    assert scales == {0.002, 0.02, 0.2} and len(rows) == 2 * 2 * 2 * 3


def test_fp16_keeps_the_gradient_and_bf16_does_not(rows):
    for (kind, precision, objective, _), row in rows.items():
        if precision == "fp16":
            assert row["cosine_min"] >= 0.99, (kind, objective, row)
    for kind in ("sd15", "sdxl"):
        for objective in {k[2] for k in rows}:
            worst = min(r["cosine_min"] for k, r in rows.items() if k[:3] == (kind, "bf16", objective))
            assert worst < 0.99, (kind, objective)  # the floor the README states, for noise-space DPO too


@pytest.mark.parametrize("name", ["sd15-dpo", "sd15-ncp-dpo", "sd15-ncp-dpo-conditioned", "sdxl-dpo",
                                  "sdxl-ncp-dpo", "sdxl-ncp-dpo-conditioned"])
def test_the_unet_configs_train_in_fp16(name):
    from ncppo.training.config import load_config

    assert load_config(ROOT / "configs" / f"{name}.yaml").mixed_precision == "fp16"
