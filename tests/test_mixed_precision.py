"""Guards ``benchmarks/results/mixed_precision.json`` (the trainer's half-precision set-up emulated on CPU):
the perceptual path of the default formulation keeps its signal in bf16 and fp16, the paper's does not.
The live counterparts are in ``tests/test_step.py`` (fp32 encoder and linear distance under bf16)."""

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "mixed_precision.json"


@pytest.fixture(scope="module")
def rows():
    record = json.loads(RESULTS.read_text())
    return {(r["kind"], row["precision"], row["objective"]): row for r in record["results"] for row in r["rows"]}


def test_every_kind_and_precision_was_measured(rows):
    kinds = {k for k, _, _ in rows}
    assert kinds == {"sd15", "sdxl"}
    for kind in kinds:
        for precision in ("bf16", "fp16"):
            for objective in ("dpo (control)", "ncp-dpo exact/model (paper)", "ncp-dpo linear/model",
                              "ncp-dpo exact/fp32"):
                assert (kind, precision, objective) in rows


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_the_default_half_precision_formulation_keeps_the_gradient(rows, kind, precision):
    """distance: auto is linear in half precision: its loss gradient keeps cosine >= 0.99 with float32's."""
    linear = rows[(kind, precision, "ncp-dpo linear/model")]
    assert linear["cosine_small_beta_min"] >= 0.99
    fp32_encoder = rows[(kind, precision, "ncp-dpo exact/fp32")]
    assert fp32_encoder["cosine_small_beta_min"] >= 0.99


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_the_papers_formulation_loses_the_signal_in_bf16(rows, kind):
    paper = rows[(kind, "bf16", "ncp-dpo exact/model (paper)")]
    assert paper["cosine_small_beta_median"] < 0.9 and paper["cosine_median"] < 0.9
