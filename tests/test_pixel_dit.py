"""The toy world's DiT class: a PixArt transformer on pixels behind the pixel pipeline's interfaces."""

import json

import numpy as np
import pytest
import torch

from ncppo.models.loading import load_pipeline
from ncppo.models.preference_model import LoraSettings, PreferenceModel
from ncppo.toy import pretrain as pretrain_module
from ncppo.toy.pretrain import QUICK, PretrainConfig

from .conftest import noised_random_pairs, perturb_lora
from .transformer_helpers import tiny_model_dir, train_each_objective

TINY_DIT = PretrainConfig(**{**QUICK.__dict__, "backbone": "dit", "dit_layers": 2, "dit_width": 32, "dit_heads": 2,
                             "steps": 6})


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory, "pixel-dit")


def test_it_loads_samples_and_predicts_as_it_samples(dit_dir):
    pipe = load_pipeline(dit_dir)
    assert type(pipe).__name__ == "PixelDiTPipeline" and pipe.vae is None
    model = PreferenceModel(pipe, lora=LoraSettings(rank=4))
    assert model.kind == "pixel-dit" and model.backbone.attribute == "transformer"
    nb = noised_random_pairs(model)
    assert nb.x_t.shape[1] == 3  # pixels are the diffusion variable
    with torch.no_grad():  # the training forward is the sampling loop's
        torch.testing.assert_close(model.predict_epsilon(model.unet, nb.x_t, nb.t, nb.condition),
                                   pipe.denoise(nb.x_t, nb.t, nb.condition.encoder_hidden_states), atol=0, rtol=0)
    run = lambda seed: pipe(["a red circle"], num_inference_steps=2, output_type="np",  # noqa: E731
                            generator=torch.Generator().manual_seed(seed)).images
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (1, 32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_ncppo_train_runs_each_objective(dit_dir, tmp_path):
    train_each_objective(dit_dir, tmp_path)


def test_its_lora_saved_then_loaded_for_sampling_gives_the_trained_policy(dit_dir, tmp_path):
    from ncppo.evaluation.sampling import load_sampling_pipeline

    model = PreferenceModel.from_pretrained(dit_dir, lora=LoraSettings(rank=4))
    perturb_lora(model.unet, scale=0.05)
    model.save_lora(tmp_path / "lora")
    fresh = load_sampling_pipeline(dit_dir, lora=tmp_path / "lora", device="cpu")
    nb = noised_random_pairs(model)
    with torch.no_grad():
        trained = model.predict_epsilon(model.unet, nb.x_t, nb.t, nb.condition)
        loaded = fresh.denoise(nb.x_t, nb.t, nb.condition.encoder_hidden_states)
        base = load_pipeline(dit_dir).denoise(nb.x_t, nb.t, nb.condition.encoder_hidden_states)
    torch.testing.assert_close(loaded, trained, atol=1e-6, rtol=0)
    assert (trained - base).abs().max() > 1e-3


def test_the_dit_recipe_pretrains_a_base_model_of_its_own_name(tmp_path):
    assert TINY_DIT.fingerprint() != PretrainConfig(**{**TINY_DIT.__dict__, "backbone": "unet"}).fingerprint()
    # the fields added with the DiT leave the U-Net's name (and so the shipped model's) as it was
    assert "backbone" not in QUICK.identity() and "backbone" in TINY_DIT.identity()
    pretrain_module.pretrain(TINY_DIT, tmp_path / "base", progress=False)
    saved = json.loads((tmp_path / "base" / "pretrain.json").read_text())
    assert saved["config"]["backbone"] == "dit" and len(saved["losses"]) == TINY_DIT.steps
    assert saved["fingerprint"] == TINY_DIT.fingerprint()
    assert type(load_pipeline(tmp_path / "base")).__name__ == "PixelDiTPipeline"
    assert pretrain_module.recipe_losses(TINY_DIT, steps=3) == pytest.approx(saved["losses"][:3], rel=1e-5)


def test_an_unknown_backbone_is_refused_naming_the_key():
    from ncppo.configuration import ConfigError
    from ncppo.toy.config import load_toy_config

    with pytest.raises(ConfigError, match="pretrain.backbone"):
        load_toy_config(overrides=["pretrain.backbone=vit"])
