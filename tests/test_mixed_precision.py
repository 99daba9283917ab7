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


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_at_the_calibrated_beta_the_default_is_as_sound_as_noise_space_dpo(rows, kind, precision):
    """At the calibrated beta the argument's own rounding (policy and reference are two half-precision U-Net
    passes) also enters the gradient; noise-space DPO has the same floor. The default stays within 0.03 of it."""
    linear = rows[(kind, precision, "ncp-dpo linear/model")]
    control = rows[(kind, precision, "dpo (control)")]
    assert linear["cosine_median"] >= 0.98 and linear["cosine_min"] >= control["cosine_min"] - 0.03
    assert linear["seconds_per_step_median"] > 0 and linear["fp32_seconds_per_step_median"] > 0


@pytest.fixture(scope="module")
def record():
    return json.loads(RESULTS.read_text())


def test_the_gpu_estimate_favours_the_half_precision_jvp_over_a_float32_encoder(record):
    """The choice of distance: auto (linear in half precision) over encoder_dtype: fp32 rests on this estimate."""
    for result in record["results"]:
        estimate = result["estimated_h100_step_time_vs_dpo_at_peak"]
        assert 1.0 < estimate["linear/model"]["all_bf16"] < estimate["exact/fp32"]["encoder_fp32"]
        assert result["fp32_linearisation_cosine_min"] > 0.999  # in float32 the JVP form loses nothing
