import json

import numpy as np
import pytest
import torch

from ncppo.evaluation import GenerationSpec, generate_samples, make_reward
from ncppo.models.loading import load_pipeline


@pytest.fixture(scope="module")
def pixel_pipe(tmp_path_factory):
    from ncppo.models.tiny import save_tiny_pipeline

    return load_pipeline(save_tiny_pipeline(tmp_path_factory.mktemp("px") / "pixel", "pixel"))


PROMPTS = ("a red circle on a blue background", "a green square on a white background", "a black triangle on a "
           "yellow background")


def test_seeds_depend_only_on_prompt_and_image_index(pixel_pipe):
    spec = GenerationSpec(PROMPTS, images_per_prompt=2, seed=3, num_inference_steps=2, batch_size=4)
    one = generate_samples(pixel_pipe, spec, progress=False)
    again = generate_samples(pixel_pipe, spec, progress=False)
    other_batching = generate_samples(pixel_pipe, GenerationSpec(**{**spec.__dict__, "batch_size": 1}), progress=False)
    assert one.images.shape == (6, 32, 32, 3) and one.images.dtype == np.uint8
    np.testing.assert_array_equal(one.images, again.images)  # same seed -> same image
    # another batch size changes BLAS summation order only: at most one uint8 level on a few pixels
    diff = np.abs(one.images.astype(int) - other_batching.images.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert list(one.prompt_ids) == [0, 0, 1, 1, 2, 2] and len(set(one.seeds.tolist())) == 6
    assert not np.array_equal(one.images[0], one.images[1])  # image 0 and 1 of a prompt differ


def test_a_subset_keeps_its_prompts_seeds_and_images(pixel_pipe):
    spec = GenerationSpec(PROMPTS, images_per_prompt=1, seed=1, num_inference_steps=2)
    whole = generate_samples(pixel_pipe, spec, progress=False)
    part = generate_samples(pixel_pipe, spec.subset([2, 0]), progress=False)
    assert part.prompts == [PROMPTS[2], PROMPTS[0]] and list(part.prompt_ids) == [2, 0]
    np.testing.assert_array_equal(part.images, whole.images[[2, 0]])
    np.testing.assert_array_equal(part.seeds, whole.seeds[[2, 0]])


def test_reward_registry():
    oracle = make_reward("oracle")
    image = np.zeros((32, 32, 3), np.uint8)
    assert oracle([image], ["a red circle on a blue background"]).shape == (1,)
    with pytest.raises(ValueError, match="did you mean 'oracle'"):
        make_reward("oracel")


def test_rewards_register_by_name_or_module_path():
    from ncppo.evaluation.rewards import _FACTORIES, register_reward, reward_names

    register_reward("test-constant", lambda weights: (lambda images, prompts: np.full(len(images), float(weights))))
    register_reward("test-lazy", "ncppo.toy.oracle:oracle_reward")
    try:
        assert {"oracle", "test-constant", "test-lazy"} <= set(reward_names())
        assert list(make_reward("test-constant", "2")([0, 0], ["a", "b"])) == [2.0, 2.0]
        assert make_reward("test-lazy").name == "oracle"
        with pytest.raises(ValueError, match="already registered"):
            register_reward("oracle", lambda weights: None)
        with pytest.raises(ValueError, match="takes no weights"):
            make_reward("oracle", "some/path")
    finally:
        _FACTORIES.pop("test-constant")
        _FACTORIES.pop("test-lazy")


def test_a_lora_for_another_base_model_and_a_sampler_for_another_family_are_one_line_errors(tiny_pipeline_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    from ncppo.evaluation.sampling import load_sampling_pipeline
    from ncppo.models.preference_model import LoraSettings, PreferenceModel
    from ncppo.models.tiny import save_tiny_pipeline

    PreferenceModel.from_pretrained(tiny_pipeline_dirs["sd15"], lora=LoraSettings(rank=2)).save_lora(tmp_path / "lora")
    load_sampling_pipeline(tiny_pipeline_dirs["sd15"], lora=tmp_path / "lora", device="cpu")  # its own model: fine
    weights = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    key = next(k for k in weights if k.endswith(("attn2.to_k.lora_A.weight", "attn2.to_k.lora.down.weight")))
    other = {**weights, key: torch.zeros(weights[key].shape[0], weights[key].shape[1] + 8)}  # another text width
    (tmp_path / "other").mkdir()
    save_file(other, tmp_path / "other" / "pytorch_lora_weights.safetensors")
    with pytest.raises(ValueError) as err:  # peft would load the rest with a warning, or list every mismatch
        load_sampling_pipeline(tiny_pipeline_dirs["sd15"], lora=tmp_path / "other", device="cpu")
    message = str(err.value)
    assert "\n" not in message and "not a LoRA for" in message and "1 have other shapes" in message
    sd3 = save_tiny_pipeline(tmp_path / "sd3", "sd3")
    with pytest.raises(ValueError, match="is a flow-matching model .*leave --scheduler out"):
        load_sampling_pipeline(sd3, scheduler="ddim", device="cpu")


def test_ncppo_generate_samples_a_pixart_lora_as_the_trained_model_does(tmp_path):
    """PixArt-Sigma has no diffusers LoRA loader: ``generate --lora`` loads ncppo's peft LoRA, and its images are
    the in-memory LoRA model's, not the base model's."""
    from PIL import Image

    from ncppo.cli import main
    from ncppo.models.preference_model import LoraSettings, PreferenceModel

    from .conftest import perturb_lora

    pixart = tmp_path / "pixart"
    assert main(["tiny-model", str(pixart), "--kind", "pixart"]) == 0
    trained = PreferenceModel.from_pretrained(pixart, lora=LoraSettings(rank=4))
    perturb_lora(trained.unet, scale=0.3)
    trained.save_lora(tmp_path / "lora")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    common = ["--model", str(pixart), "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2", "--height", "32",
              "--width", "32"]
    assert main(["generate", *common, "--out", str(tmp_path / "base")]) == 0
    assert main(["generate", *common, "--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "lora-set")]) == 0

    def read(folder):
        return np.stack([np.asarray(Image.open(p)) for p in sorted((folder / "images").glob("*.png"))])

    base, loaded = read(tmp_path / "base"), read(tmp_path / "lora-set")
    spec = GenerationSpec(("a red circle", "a blue square"), num_inference_steps=2, height=32, width=32)
    with torch.no_grad():
        in_memory = generate_samples(trained.pipeline, spec, progress=False).images  # render_images adds PixArt's call options
    assert base.shape == loaded.shape == (2, 32, 32, 3)
    recorded = json.loads((tmp_path / "base" / "generation.json").read_text())["call_options"]
    assert recorded == {"use_resolution_binning": False, "clean_caption": False}  # sets compare only when made alike
    np.testing.assert_array_equal(loaded, in_memory)
    assert np.abs(loaded.astype(int) - base.astype(int)).mean() > 1  # the LoRA changes the images
    from safetensors.torch import load_file, save_file

    from ncppo.evaluation.sampling import load_sampling_pipeline

    weights = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    key = next(k for k in weights if k.startswith("transformer.") and k.endswith("attn2.to_k.lora_A.weight"))
    (tmp_path / "other").mkdir()
    save_file({**weights, key: torch.zeros(weights[key].shape[0], weights[key].shape[1] + 8)},
              tmp_path / "other" / "pytorch_lora_weights.safetensors")
    with pytest.raises(ValueError, match="not a LoRA for .*0 of its layers are not in this model and 1 have other"):
        load_sampling_pipeline(pixart, lora=tmp_path / "other", device="cpu")  # a transformer's LoRA is checked too
