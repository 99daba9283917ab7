"""PixArt-Sigma's DiT: a transformer without flow matching (DDPM, epsilon with learned variance, masked T5 text)."""

import math

import pytest
import torch

from ncppo.batch import PreferenceBatch
from ncppo.models.preference_model import LoraSettings, PreferenceModel
from ncppo.objectives import OBJECTIVE_NAMES, make_objective
from ncppo.perception import NoiseConditionedEncoder
from ncppo.step import training_step

from .conftest import noised_random_pairs, perturb_lora, random_pairs
from .transformer_helpers import tiny_model_dir


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory, "pixart")


@pytest.fixture
def model(pixart_dir):
    return PreferenceModel.from_pretrained(pixart_dir, lora=LoraSettings(rank=4))


def test_pixart_is_a_ddpm_dit_with_learned_variance_and_masked_text(model):
    from diffusers import PixArtSigmaPipeline

    from ncppo.diffusion import NoiseSchedule

    assert isinstance(model.pipeline, PixArtSigmaPipeline) and model.kind == "pixart"
    assert isinstance(model.schedule, NoiseSchedule) and model.schedule.prediction_type == "epsilon"
    nb = noised_random_pairs(model)
    mask = nb.condition.attention_mask
    assert mask is not None and mask.shape == nb.condition.encoder_hidden_states.shape[:2]
    assert 0 < int(mask[0].sum()) < mask.shape[1]  # the prompt's tokens, then padding
    with torch.no_grad():
        eps = model.predict_epsilon(model.unet, nb.x_t, nb.t, nb.condition)
        full = model.unet(nb.x_t, encoder_hidden_states=nb.condition.encoder_hidden_states, timestep=nb.t,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                          encoder_attention_mask=mask).sample
    assert full.shape[1] == 2 * nb.x_t.shape[1]  # epsilon and the variance
    torch.testing.assert_close(eps, full[:, :4], atol=0, rtol=0)


def test_the_text_mask_is_applied(model):
    """Padding embeddings replaced by noise change nothing: the model attends to the prompt's tokens only."""
    nb = noised_random_pairs(model, seed=1)
    cond = nb.condition
    noisy = cond.encoder_hidden_states.clone()
    pad = ~cond.attention_mask.bool()
    noisy[pad] = torch.randn(int(pad.sum()), noisy.shape[-1])
    from ncppo.batch import Condition

    with torch.no_grad():
        a = model.predict_epsilon(model.unet, nb.x_t, nb.t, cond)
        b = model.predict_epsilon(model.unet, nb.x_t, nb.t, Condition(noisy, attention_mask=cond.attention_mask))
        c = model.predict_epsilon(model.unet, nb.x_t, nb.t, Condition(noisy))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (a - c).abs().max() > 1e-4


@pytest.mark.parametrize("features,blocks", [("last", 0.5), ("all", 1.0), ("last", (1, 3))])
def test_encoder_equals_the_hooked_hidden_states_of_a_full_forward(model, features, blocks):
    nb = noised_random_pairs(model, seed=2)
    enc = NoiseConditionedEncoder(features, blocks=blocks)
    hooked = {}
    handles = [blk.register_forward_hook(lambda m, a, out, i=i: hooked.__setitem__(i, out))
               for i, blk in enumerate(model.unet.transformer_blocks)]
    with torch.no_grad(), model.frozen_unet() as frozen:
        try:
            model.backbone.forward(frozen, nb.x_t, nb.t, nb.condition)
        finally:
            for h in handles:
                h.remove()
        feats = enc(frozen, nb.x_t, nb.t, **nb.condition.unet_kwargs())
    for name, f in zip(enc.levels(model.unet), feats, strict=True):
        torch.testing.assert_close(f, hooked[int(name.split("_")[1])].transpose(1, 2), atol=0, rtol=0)


def test_lora_off_is_the_base_and_a_saved_lora_loads_into_a_fresh_pipeline(model, pixart_dir, tmp_path):
    from ncppo.models.loading import load_pipeline
    from ncppo.models.transformers_backbone import load_peft_lora

    nb = noised_random_pairs(model, seed=3)
    base = PreferenceModel.from_pretrained(pixart_dir, finetune="none")
    perturb_lora(model.unet, scale=0.3)
    model.save_lora(tmp_path / "lora")
    fresh = load_pipeline(pixart_dir)
    load_peft_lora(fresh, tmp_path / "lora")
    loaded = PreferenceModel(fresh, finetune="none")
    with torch.no_grad():
        expected = base.predict_epsilon(base.unet, nb.x_t, nb.t, nb.condition)
        with model.frozen_unet() as frozen:
            off = model.predict_epsilon(frozen, nb.x_t, nb.t, nb.condition)
        on = model.predict_epsilon(model.unet, nb.x_t, nb.t, nb.condition)
        theirs = loaded.predict_epsilon(loaded.unet, nb.x_t, nb.t, nb.condition)
    torch.testing.assert_close(off, expected, atol=0, rtol=0)
    assert (on - expected).abs().max() > 1e-4
    torch.testing.assert_close(theirs, on, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
def test_every_objective_trains_the_lora(model, name):
    objective = make_objective(name)
    objective.validate(model)
    if objective.needs_reference_prediction:
        at_init = training_step(model, objective, random_pairs(), generator=torch.Generator().manual_seed(0))
        assert at_init.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    perturb_lora(model.unet, scale=0.05)
    out = training_step(model, objective, random_pairs(), generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    grads = [p.grad for n, p in model.unet.named_parameters() if "lora" in n and p.grad is not None]
    assert torch.isfinite(out.loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for n, p in model.unet.named_parameters() if "lora" not in n)


def test_cached_embeddings_without_their_mask_are_refused(model):
    embeds, _ = model.encode_prompts(["a red circle", "a blue square"])
    latents = torch.randn(2, 4, 16, 16)
    with pytest.raises(ValueError, match="prompt_attention_mask of shape"):
        model.encode_batch(PreferenceBatch(latents_w=latents, latents_l=latents, prompt_embeds=embeds))


def test_ncppo_train_runs_each_objective(pixart_dir, tmp_path):
    from ncppo.models.loading import load_pipeline
    from ncppo.models.transformers_backbone import load_peft_lora

    from .transformer_helpers import train_each_objective

    for run in train_each_objective(pixart_dir, tmp_path).values():
        fresh = load_pipeline(pixart_dir)
        load_peft_lora(fresh, run / "lora")  # diffusers has no load_lora_weights for PixArt-Sigma
        assert any("lora" in n for n, _ in fresh.transformer.named_parameters())


def test_validation_images_sample_pixart_at_the_training_resolution(model):
    """The trainer's validation images call the pipeline with its call options (PixArt would otherwise snap
    the size to its aspect-ratio table and refuse the tiny transformer)."""
    from ncppo.training.validation import sample

    images = sample(model, ["a red circle", "a blue square"], steps=2, resolution=32)
    assert images.shape == (2, 32, 32, 3) and images.dtype.name == "uint8"
