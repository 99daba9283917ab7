import json
import math

import pytest
import torch

from ncppo.models.loading import load_pipeline
from ncppo.models.preference_model import LoraSettings, PreferenceModel
from ncppo.models.tiny import save_tiny_pipeline
from ncppo.objectives import make_objective
from ncppo.step import training_step

from .conftest import perturb_lora, random_pairs
from .data_helpers import write_dataset


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("px") / "pixel", "pixel", prediction_type="v_prediction")


def _probe(unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([5, 800]), encoder_hidden_states=ehs).sample


def test_saves_loads_and_samples(pixel_dir):
    index = json.loads((pixel_dir / "model_index.json").read_text())
    assert index["_class_name"] == "PixelTextToImagePipeline" and "vae" not in index
    pipe = load_pipeline(pixel_dir)
    assert type(pipe).__name__ == "PixelTextToImagePipeline" and pipe.scheduler.config.prediction_type == "v_prediction"
    prompts = ["a red circle on a blue background", "a green square on a white background"]
    for guidance in (1.0, 3.0):
        images = pipe(prompts, num_inference_steps=3, guidance_scale=guidance, output_type="np",
                      generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
        assert images.shape == (2, 32, 32, 3) and images.min() >= 0 and images.max() <= 1
    again = pipe(prompts[:1], num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    same = pipe(prompts[:1], num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert (again == same).all()  # a seed fixes the sample: paired comparisons across models
    embeds, negative = pipe.encode_prompt(prompts, "cpu", num_images_per_prompt=2, do_classifier_free_guidance=True)
    assert embeds.shape == negative.shape == (4, 77, 32)


def test_trains_in_pixel_space_and_round_trips_the_lora(tmp_path, pixel_dir):
    model = PreferenceModel(load_pipeline(pixel_dir), lora=LoraSettings(rank=4, alpha=8))
    assert model.kind == "pixel" and model.schedule.prediction_type == "v_prediction"
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(model.encode_images(pixels), pixels)  # no VAE: the images are the diffusion variable
    for name in ("dpo", "ncp-dpo"):
        out = training_step(model, make_objective(name), random_pairs(), generator=torch.Generator().manual_seed(0))
        assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    perturb_lora(model.unet)
    out = training_step(model, make_objective("ncp-cpo"), random_pairs(), generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())
    model.save_lora(tmp_path / "lora")
    fresh = load_pipeline(pixel_dir)
    fresh.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(_probe(fresh.unet), _probe(model.unet), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model.encode_images(torch.zeros(2, 4, 32, 32))


def test_trainer_runs_a_pixel_model(tmp_path, pixel_dir):
    from ncppo.training import Trainer, load_config

    data = write_dataset(tmp_path / "pairs", [(f"a red circle on a blue background {k}", f"w{k}", f"l{k}", 1) for k in range(4)])
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"model.pretrained={pixel_dir}", "model.lora_rank=4",
                             f"data.source={data}", "data.resolution=32", "batch_size=2", "max_steps=2",
                             "objective.name=ncp-dpo", "optim.scale_lr=false", "optim.learning_rate=1e-3"])
    result = Trainer(cfg).train()
    assert result.steps == 2 and (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
