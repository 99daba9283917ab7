"""``ncppo curve`` on a PixArt-Sigma run: its checkpoints' LoRAs sampled with PixArt's call options (no aspect-ratio
snapping, which refuses the tiny transformer's sample size, and no caption cleaning)."""

import json

import numpy as np
import pytest

from ncppo.evaluation.generation import GenerationSpec


class MeanBrightness:
    """A reward that needs no weights: the image's mean pixel value."""

    name = "brightness"

    def __call__(self, images, prompts) -> np.ndarray:
        return np.array([np.asarray(i, dtype=np.float64).mean() for i in images])


def test_curve_scores_every_checkpoint_of_a_pixart_run(tmp_path):
    from ncppo.cli import main
    from ncppo.evaluation.curves import run_curves
    from ncppo.evaluation.image_sets import load_image, read_manifest
    from ncppo.evaluation.prompts import load_prompts
    from ncppo.evaluation.runs import run_checkpoints
    from ncppo.training import Trainer, load_config

    from .data_helpers import write_dataset

    pixart = tmp_path / "pixart"
    assert main(["tiny-model", str(pixart), "--kind", "pixart"]) == 0
    data = write_dataset(tmp_path / "pairs", [(f"a red shape {k}", f"w{k}", f"l{k}", 1) for k in range(4)])
    run = tmp_path / "run"
    Trainer(load_config(None, [f"output_dir={run}", f"model.pretrained={pixart}", f"data.source={data}",
                               "model.lora_rank=4", "data.resolution=32", "batch_size=2", "max_steps=2",
                               "checkpoint_every_steps=1", "optim.learning_rate=1e-2", "optim.scale_lr=false"])).train()
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    prompts = load_prompts(tmp_path / "prompts.txt")
    spec = GenerationSpec(tuple(prompts.prompts), num_inference_steps=2, height=32, width=32)
    curves = run_curves([run], prompts, spec, MeanBrightness(), tmp_path / "curves", progress=False)
    checkpoints = run_checkpoints(run)
    points = curves["run"]
    assert [p["step"] for p in points] == [0] + [c.step for c in checkpoints] == [0, 1, 2]
    assert all(np.isfinite(p["mean"]) for p in points)
    assert json.loads((tmp_path / "curves" / "curves.json").read_text())["curves"]["run"] == points

    def images(folder):
        return np.stack([load_image(folder, r) for r in read_manifest(folder)])

    base, last = images(tmp_path / "curves" / "base"), images(tmp_path / "curves" / "run" / checkpoints[-1].path.name)
    assert base.shape == last.shape == (2, 32, 32, 3)  # the asked size, not the aspect-ratio table's
    assert points[-1]["mean"] == pytest.approx(last.astype(np.float64).mean())
    assert np.abs(last.astype(int) - base.astype(int)).mean() > 0  # the checkpoint's LoRA was applied
