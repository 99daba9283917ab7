"""Trackers through accelerate: metrics, the run's settings and validation images with their prompts reach a
tracker; a tracker whose package is missing stops the run before anything is loaded (one line)."""

import sys
import types

import numpy as np
import pytest
from accelerate.tracking import GeneralTracker

from ncppo.errors import MissingDependencyError
from ncppo.training import Trainer, load_config
from ncppo.training.logging import log_images

from .data_helpers import write_dataset

SPEC = [(f"a {c} shape {k}", f"w{k}{c}", f"l{k}{c}", k % 2) for k in range(6) for c in ("red", "blue")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "pairs", SPEC, rows_per_shard=5)


class Recorder(GeneralTracker):
    """A custom accelerate tracker that keeps what it is given."""

    name = "recorder"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.config, self.rows, self.images, self.finished = None, [], [], 0

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.rows.append((step, dict(values)))

    def log_images(self, values, step=None, **kwargs):
        self.images.append((step, values))

    def finish(self):
        self.finished += 1


def _config(tmp_path, model_dir, dataset, *overrides):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", f"model.pretrained={model_dir}", "model.lora_rank=4",
                              f"data.source={dataset}", "data.resolution=32", "batch_size=2", "objective.name=dpo",
                              "objective.beta=5e6", "optim.learning_rate=1e-3", "optim.scale_lr=false", "max_steps=2",
                              *overrides])


def test_a_custom_tracker_gets_the_settings_metrics_and_validation_images(tmp_path, tiny_pipeline_dirs, dataset):
    recorder = Recorder()
    cfg = _config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, "validation_every=1", "validation_steps=1",
                  "validation_prompts=[a red shape, a blue shape]", "run_name=first try")
    result = Trainer(cfg, trackers=[recorder]).train()
    assert recorder.config["objective.name"] == "dpo" and recorder.config["resolved.learning_rate"] == 1e-3
    assert recorder.config["run_name"] == "first try" and recorder.config["model.lora_targets"] == '["to_q", "to_k", "to_v", "to_out.0"]'
    assert all(isinstance(v, (int, float, str, bool)) for v in recorder.config.values())
    metrics = [(step, row) for step, row in recorder.rows if "loss" in row]
    assert [step for step, _ in metrics] == [1, 2] and all("grad_norm" in row and "lr" in row for _, row in metrics)
    prompts = [(step, row["validation/prompts"]) for step, row in recorder.rows if "validation/prompts" in row]
    assert prompts[:2] == [(1, "00: a red shape  \n01: a blue shape"), (2, "00: a red shape  \n01: a blue shape")]
    tags = [(step, sorted(values)) for step, values in recorder.images]
    assert tags == [(1, ["validation/00", "validation/01"]), (2, ["validation/00", "validation/01"]),
                    (2, ["validation/00", "validation/01"]),  # the end of the run
                    (2, ["comparison/base/00", "comparison/base/01"]), (2, ["comparison/lora/00", "comparison/lora/01"])]
    image = recorder.images[0][1]["validation/00"][0]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert recorder.finished == 1 and result.summary["run_name"] == "first try"
    assert (tmp_path / "run" / "lora" / "first_try_kohya.safetensors").is_file()
    assert (tmp_path / "run" / "validation" / "comparison.png").stat().st_size > 0


@pytest.mark.parametrize("name,modules", [("wandb", ["wandb"]), ("tensorboard", ["tensorboard", "tensorboardX"])])
def test_a_missing_tracker_package_stops_the_run_before_it_starts(tmp_path, tiny_pipeline_dirs, dataset, monkeypatch,
                                                                  capsys, name, modules):
    from ncppo.cli import main

    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # not importable, whether installed or not
    cfg = _config(tmp_path, tiny_pipeline_dirs["sd15"], dataset, f"report_to={name}")
    with pytest.raises(MissingDependencyError, match=rf"^report_to: {name} needs the optional package '{modules[0]}': "
                                                     rf"pip install 'ncppo\[{name}\]'$"):
        Trainer(cfg).train()
    assert not (tmp_path / "run").exists()  # nothing was written (and no model loaded)
    (tmp_path / "c.yaml").write_text(f"model: {{pretrained: {tiny_pipeline_dirs['sd15']}}}\ndata: {{source: {dataset}}}\n"
                                     f"output_dir: {tmp_path / 'run'}\nreport_to: jsonl,{name}\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"ncppo[{name}]" in err


def test_tensorboard_and_wandb_get_images_with_their_prompts(monkeypatch):
    images = np.zeros((2, 8, 8, 3), np.uint8)

    class Fake:
        def __init__(self, name):
            self.name, self.calls = name, []

        def log(self, values, step=None):
            self.calls.append(("log", values, step))

        def log_images(self, values, step=None, **kwargs):
            self.calls.append(("log_images", values, step, kwargs))

    wandb = types.ModuleType("wandb")
    wandb.Image = lambda image, caption=None: ("Image", image.shape, caption)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    tb, wb = Fake("tensorboard"), Fake("wandb")
    log_images([tb, wb], "validation", images, ["a cat", "a dog"], 3)
    (kind, values, step, kwargs), (_, text, _) = tb.calls
    assert kind == "log_images" and step == 3 and kwargs == {"dataformats": "NHWC"}
    assert {k: v.shape for k, v in values.items()} == {"validation/00": (1, 8, 8, 3), "validation/01": (1, 8, 8, 3)}
    assert text == {"validation/prompts": "00: a cat  \n01: a dog"}
    assert wb.calls == [("log", {"validation": [("Image", (8, 8, 3), "a cat"), ("Image", (8, 8, 3), "a dog")]}, 3)]


def test_tracker_settings_are_in_the_config_and_extras_in_pyproject():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    cfg = load_config(None, ["model.pretrained=/m", "data.source=/d", "report_to=wandb", "tracker_project=prefs",
                             "run_name=ncp-1"])
    assert cfg.report_to == ["wandb"] and cfg.tracker_project == "prefs" and cfg.run_name == "ncp-1"
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("tensorboard") for r in extras["tensorboard"])
    assert any(r.startswith("wandb") for r in extras["wandb"])
