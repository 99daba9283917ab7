"""Issue 14.4: the diagnostics a user acts on -- PL / L by timestep bin, the sigmoid argument's RMS and saturated
share, the gradient norm before clipping, and the once-only warnings (loss at log 2, updates under AdamW's eps) --
in the step's metrics, the training log (metrics.jsonl) and the run summary (summary.json)."""

import json
import types

import pytest
import torch

from ncppo.batch import Condition
from ncppo.objectives import make_objective
from ncppo.objectives.spaces import NoisedBatch
from ncppo.training import Trainer
from ncppo.training.diagnostics import EPS_DOMINATED, FLAT_ARGUMENT, Diagnostics

from .data_helpers import write_dataset
from .test_training import _config

SPEC = [(f"a {c} shape {k}", f"w{k}{c}", f"l{k}{c}", k % 2) for k in range(4) for c in ("red", "blue")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "pairs", SPEC, rows_per_shard=5)


def test_pl_over_l_is_reported_per_quarter_of_the_timestep_range():
    t = torch.tensor([0, 249, 250, 999, 600])  # quarters 0, 0, 1, 3, 2
    eps = torch.zeros(5, 1, 1, 2)
    eps_theta = torch.arange(1.0, 6.0).view(5, 1, 1, 1).expand(5, 1, 1, 2)  # noise MSE per sample: 1, 4, 9, 16, 25
    batch = NoisedBatch(x0=eps, x_t=eps, t=t, eps=eps, z=eps, condition=Condition(torch.zeros(5, 1, 1)))
    pl = torch.tensor([0.5, 8.0, 0.9, 1.6, 50.0])
    model = types.SimpleNamespace(schedule=types.SimpleNamespace(num_train_timesteps=1000))
    out = make_objective("ncp-dpo").space.diagnostics(model, batch, eps_theta, pl)
    assert set(out) == {"pl_over_l_t0", "pl_over_l_t1", "pl_over_l_t2", "pl_over_l_t3"}
    assert out["pl_over_l_t0"].item() == pytest.approx((0.5 + 2.0) / 2)
    assert out["pl_over_l_t1"].item() == pytest.approx(0.1)
    assert out["pl_over_l_t2"].item() == pytest.approx(2.0)
    assert out["pl_over_l_t3"].item() == pytest.approx(0.1)
    one_bin = NoisedBatch(x0=eps[:2], x_t=eps[:2], t=t[:2], eps=eps[:2], z=eps[:2], condition=Condition(torch.zeros(2, 1, 1)))
    assert set(make_objective("ncp-dpo").space.diagnostics(model, one_bin, eps_theta[:2], pl[:2])) == {"pl_over_l_t0"}
    assert make_objective("dpo").space.diagnostics(model, batch, eps_theta, pl) == {}  # noise space: PL is L


def _watch(window=3):
    config = types.SimpleNamespace(diagnostics_window=window, optim=types.SimpleNamespace(adam_epsilon=1e-8))
    said = []
    return Diagnostics(config, said.append), said


def test_warnings_need_the_condition_for_a_whole_window_and_come_once():
    watch, said = _watch(window=3)
    flat, healthy = FLAT_ARGUMENT / 10, FLAT_ARGUMENT * 10
    for step, arg in enumerate([flat, flat, healthy, flat, flat], start=1):  # a healthy step resets the run
        watch.observe(step, {"argument_rms": arg})
    assert said == [] and watch.runs["flat_argument"] == 2
    for step in (6, 7, 8):
        watch.observe(step, {"argument_rms": flat, "eps_dominated_frac": EPS_DOMINATED + 0.1})
    assert [w["code"] for w in watch.warnings] == ["flat_loss", "eps_dominated"]
    assert [w["step"] for w in watch.warnings] == [6, 8]  # flat since step 4: its third logged step is 6
    assert len(said) == 2 and "log 2" in said[0] and "below AdamW's eps" in said[1] and "adam_epsilon=1e-08" in said[1]
    assert "argument_rms" in watch.warnings[0]["message"]
    # no SFT argument (None) and a non-finite one never count
    watch2, said2 = _watch(window=1)
    watch2.observe(1, {"argument_rms": None, "eps_dominated_frac": None})
    watch2.observe(2, {"argument_rms": float("nan")})
    assert said2 == []


def test_summary_has_final_and_mean_of_every_diagnostic():
    rows = [{"loss": 0.7, "argument_rms": 1.0, "grad_norm": 3.0, "pl_over_l_t0": 0.2},
            {"loss": 0.5, "argument_rms": 2.0, "grad_norm": float("nan"), "pl_over_l_t3": 4.0}]
    summary = Diagnostics.summarise(rows)
    assert summary["argument_rms"] == {"final": 2.0, "mean": 1.5}
    assert summary["grad_norm"] == {"final": 3.0, "mean": 3.0}  # the skipped (non-finite) step is left out
    assert summary["pl_over_l_t0"] == {"final": 0.2, "mean": 0.2} and "pl_over_l_t3" in summary


def test_a_runs_log_and_summary_carry_the_ncp_diagnostics(tmp_path, tiny_pipeline_dirs, dataset):
    """The gradient norm logged is the one before clipping: with max_grad_norm 1e-6 every step is clipped, and
    the logged norm is far above 1e-6."""
    cfg = _config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, "objective.name=ncp-dpo", "optim.max_grad_norm=1e-6",
                  "checkpoint_every_steps=null", "batch_size=4")
    Trainer(cfg).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert {"argument_rms", "saturated_frac", "eps_dominated_frac", "grad_norm", "grad_norm_clipped"} <= set(row)
        assert any(k.startswith("pl_over_l_t") for k in row)
        assert row["grad_norm"] > 1e-3 and row["grad_norm_clipped"] == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["diagnostics"]
    assert {"argument_rms", "saturated_frac", "grad_norm", "grad_norm_clipped", "eps_dominated_frac"} <= set(summary)
    logged_bins = {k for r in rows for k in r if k.startswith("pl_over_l_t")}
    assert logged_bins and logged_bins <= set(summary)
    assert summary["grad_norm_clipped"]["mean"] == 1.0


def test_beta_auto_is_logged_with_the_value_written_to_the_resolved_config(tmp_path, tiny_pipeline_dirs, dataset, capsys):
    import yaml

    cfg = _config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, "objective.name=ncp-dpo", "objective.beta=auto",
                  "objective.calibration_batches=1", "max_steps=1", "checkpoint_every_steps=null")
    Trainer(cfg).train()
    beta = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["resolved"]["beta"]
    assert f"beta: auto -> {beta:.6g} (noise MSE / ncp-dpo loss = " in capsys.readouterr().out
