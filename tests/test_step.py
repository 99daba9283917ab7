import math

import pytest
import torch

from ncppo.batch import PreferenceBatch
from ncppo.diffusion import reverse_step
from ncppo.models.preference_model import LoraSettings, PreferenceModel
from ncppo.objectives import OBJECTIVE_NAMES, make_objective
from ncppo.step import noise_pairs, training_step

from .conftest import perturb_lora, random_pairs


@pytest.fixture
def model(pipeline):
    return PreferenceModel(pipeline, lora=LoraSettings(rank=4))


@pytest.mark.parametrize("name", ["dpo", "ncp-dpo"])
def test_dpo_is_log2_when_policy_equals_reference(model, name):
    out = training_step(model, make_objective(name), random_pairs(), generator=torch.Generator().manual_seed(0))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["reward_margin"].item() == 0.0


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
def test_every_objective_trains_lora_only(model, name):
    perturb_lora(model.unet, scale=0.05)
    out = training_step(model, make_objective(name), random_pairs(), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    lora = [p for n, p in model.unet.named_parameters() if "lora" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    base = [p for n, p in model.unet.named_parameters() if "lora" not in n]
    assert all(p.grad is None for p in base)
    for frozen in model._frozen_components():
        assert all(p.grad is None for p in frozen.parameters())


def test_ncp_encoder_weights_get_no_grad_in_full_finetune(pipeline):
    model = PreferenceModel(pipeline, finetune="full")
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    out = training_step(model, make_objective("ncp-dpo"), random_pairs(), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert all(p.grad is None for p in model.reference_unet.parameters())
    assert sum(p.grad.abs().sum().item() for p in model.unet.parameters() if p.grad is not None) > 0


def test_winner_and_loser_share_t_eps_and_z(model):
    pairs = model.encode_batch(random_pairs(batch_size=3))
    nb = noise_pairs(model, pairs, True, torch.Generator().manual_seed(0))
    assert nb.x_t.shape[0] == 6
    assert torch.equal(nb.t[:3], nb.t[3:]) and torch.equal(nb.eps[:3], nb.eps[3:]) and torch.equal(nb.z[:3], nb.z[3:])
    assert not torch.equal(nb.eps[0], nb.eps[1])
    sft = noise_pairs(model, pairs, False, torch.Generator().manual_seed(0))
    assert sft.x_t.shape[0] == 3


def test_raw_and_encoded_batches_give_the_same_step(model, kind):
    perturb_lora(model.unet, scale=0.05)
    raw = random_pairs()
    latents_w = model.encode_images(raw.pixel_values_w, torch.Generator().manual_seed(5))
    latents_l = model.encode_images(raw.pixel_values_l, torch.Generator().manual_seed(6))
    embeds, pooled = model.encode_prompts(raw.prompts)
    cached = PreferenceBatch(latents_w=latents_w, latents_l=latents_l, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    mixed = PreferenceBatch(latents_w=latents_w, latents_l=latents_l, prompts=raw.prompts)
    objective = make_objective("ncp-dpo")
    losses = [training_step(model, objective, b, generator=torch.Generator().manual_seed(9)).loss.item()
              for b in (cached, mixed, model.encode_batch(cached))]
    assert losses[0] == losses[1] == losses[2]
    again = training_step(model, objective, cached, generator=torch.Generator().manual_seed(9)).loss.item()
    assert again == losses[0]


def test_ncp_space_matches_a_hand_written_computation(model, kind):
    perturb_lora(model.unet, scale=0.2)
    objective = make_objective("ncp-dpo")
    pairs = model.encode_batch(random_pairs())
    g = torch.Generator().manual_seed(3)
    nb = noise_pairs(model, pairs, True, g)
    cond = nb.condition.unet_kwargs()
    with torch.no_grad():
        eps_theta = model.predict_epsilon(model.unet, nb.x_t, nb.t, nb.condition)
        with model.frozen_unet() as ref:
            eps_ref = model.predict_epsilon(ref, nb.x_t, nb.t, nb.condition)
            t_prev = (nb.t - 1).clamp(min=0)
            feats = {}
            for key, e in (("theta", eps_theta), ("ref", eps_ref), ("true", nb.eps)):
                x_prev = reverse_step(model.schedule, nb.x_t, e, nb.t, nb.z)
                feats[key] = objective.space.encoder(ref, x_prev, t_prev, **cond)[0]
        expected_policy = (feats["theta"] - feats["true"]).pow(2).flatten(1).mean(1)
        expected_ref = (feats["ref"] - feats["true"]).pow(2).flatten(1).mean(1)
        policy, reference = objective.space.losses(model, nb, eps_theta, eps_ref)
    torch.testing.assert_close(policy, expected_policy, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(reference, expected_ref, rtol=1e-4, atol=1e-9)
    assert (policy > 0).all() and not torch.allclose(policy, reference)


def test_gradient_checkpointing_does_not_change_ncp_gradients(model):
    perturb_lora(model.unet, scale=0.05)
    objective = make_objective("ncp-sft")

    def grads():
        model.unet.zero_grad(set_to_none=True)
        out = training_step(model, objective, random_pairs(), generator=torch.Generator().manual_seed(2))
        out.loss.backward()
        return [p.grad.clone() for p in model.trainable_parameters()]

    plain = grads()
    model.unet.train()
    model.unet.enable_gradient_checkpointing()
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("timestep", ["t-2", "t-5", "uniform"])
def test_encoder_timestep_variants_run(model, timestep):
    perturb_lora(model.unet, scale=0.05)
    objective = make_objective("ncp-dpo", encoder_timestep=timestep, features="last+mid")
    out = training_step(model, objective, random_pairs(), generator=torch.Generator().manual_seed(4))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.metrics["loss_w_policy"] > 0


def test_v_prediction_model_steps():
    from ncppo.models.tiny import build_tiny_pipeline

    model = PreferenceModel(build_tiny_pipeline("sd15", prediction_type="v_prediction"), lora=LoraSettings(rank=2))
    out = training_step(model, make_objective("ncp-dpo"), random_pairs(), generator=torch.Generator().manual_seed(0))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
