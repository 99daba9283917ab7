"""The objective's options through the trainer: YAML keys, beta auto, ties."""

import pytest
import yaml

from ncppo.training import Trainer, load_config
from ncppo.training.config import ConfigError

from .data_helpers import write_dataset
from .test_training import _config

SPEC = [(f"a {c} shape {k}", f"w{k}{c}", f"l{k}{c}", k % 2) for k in range(4) for c in ("red", "blue")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "pairs", SPEC, rows_per_shard=5)


def test_every_objective_option_is_settable_from_yaml(tmp_path, tiny_pipeline_dirs, dataset):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"objective": {
        "name": "ncp-dpo", "features": "all+mid", "level_weights": [1, 2, 3], "level_norm": "channels",
        "encoder_timestep": "t-2", "scale": "noise", "distance": "linear", "encoder_dtype": "fp32", "beta": 2e4}}))
    cfg = load_config(path, [f"model.pretrained={tiny_pipeline_dirs['sd15']}", f"data.source={dataset}"])
    options = cfg.objective.options()
    assert options["level_weights"] == (1.0, 2.0, 3.0) and options["distance"] == "linear"
    with pytest.raises(ConfigError, match="objective: unknown perceptual scale 'big'; expected one of paper, noise"):
        load_config(path, [f"model.pretrained={tiny_pipeline_dirs['sd15']}", f"data.source={dataset}",
                           "objective.scale=big"])
    with pytest.raises(ConfigError, match="has none"):
        load_config(None, [f"model.pretrained={tiny_pipeline_dirs['sd15']}", f"data.source={dataset}",
                           "objective.name=ncp-sft", "objective.beta=auto"])


def test_ties_are_refused_for_sft(tiny_pipeline_dirs, dataset):
    with pytest.raises(ConfigError, match="tie_policy.*sft cannot use"):
        load_config(None, [f"model.pretrained={tiny_pipeline_dirs['sd15']}", f"data.source={dataset}",
                           "objective.name=sft", "data.tie_policy=keep"])


def test_beta_auto_is_calibrated_recorded_and_reproduced(tmp_path, tiny_pipeline_dirs, dataset):
    cfg = _config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, "objective.name=ncp-dpo", "objective.beta=auto",
                  "objective.scale=noise", "objective.calibration_batches=2")
    Trainer(cfg).train()
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["resolved"]
    beta = resolved["beta"]
    assert beta > 0 and resolved["beta_calibration"]["samples"] == 2 * 2 * 2  # 2 batches x 2 pairs x 2 images
    assert beta != 5000.0  # PL / noise MSE is not 1 for the perceptual objective
    other = tmp_path / "again"
    cfg2 = _config(other, tiny_pipeline_dirs["sd15"], dataset, "objective.name=ncp-dpo", "objective.beta=auto",
                   "objective.scale=noise", "objective.calibration_batches=2")
    Trainer(cfg2).train()
    assert yaml.safe_load((other / "run" / "config.yaml").read_text())["resolved"]["beta"] == beta
