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
    objective = make_objective("ncp-dpo", scale="paper")  # the paper's PL, as written in METHOD.md (13)
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
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    # equal up to float32 recomputation, which the noise scale's 1/c^2 amplifies near t = 0
    a, b = torch.cat([g.flatten() for g in plain]), torch.cat([g.flatten() for g in checkpointed])
    assert torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0) > 1 - 1e-6
    torch.testing.assert_close(a.norm(), b.norm(), rtol=1e-4, atol=0)
    objective = make_objective("ncp-sft", scale="paper")  # the paper's scale: elementwise equal
    model.unet.disable_gradient_checkpointing()
    plain = grads()
    model.enable_gradient_checkpointing()
    for a, b in zip(plain, grads()):
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


def _lora_grad(model, objective, batch, seed=4):
    model.unet.zero_grad(set_to_none=True)
    out = training_step(model, objective, batch, generator=torch.Generator().manual_seed(seed))
    out.loss.backward()
    return out, torch.cat([p.grad.flatten() for p in model.trainable_parameters()])


def test_linear_distance_agrees_with_exact_in_float32(model):
    """The JVP form equals the exact distance to second order: same losses to 1e-3, same gradient direction."""
    perturb_lora(model.unet, scale=0.05)
    batch = random_pairs()
    exact, g_exact = _lora_grad(model, make_objective("ncp-dpo", scale="noise"), batch)
    linear, g_linear = _lora_grad(model, make_objective("ncp-dpo", scale="noise", distance="linear"), batch)
    for key in ("loss_w_policy", "loss_l_policy", "loss_w_reference", "loss_l_reference"):
        assert linear.metrics[key].item() == pytest.approx(exact.metrics[key].item(), rel=5e-2)
    assert torch.nn.functional.cosine_similarity(g_exact, g_linear, dim=0) > 0.99


def test_noise_scale_divides_each_loss_by_its_squared_gain(model):
    from ncppo.diffusion import posterior_gain

    perturb_lora(model.unet, scale=0.05)
    pairs = model.encode_batch(random_pairs())
    nb = noise_pairs(model, pairs, True, torch.Generator().manual_seed(3))
    with torch.no_grad():
        eps_theta = model.predict_epsilon(model.unet, nb.x_t, nb.t, nb.condition)
        paper, _ = make_objective("ncp-dpo", scale="paper").space.losses(model, nb, eps_theta)
        noise, _ = make_objective("ncp-dpo", scale="noise").space.losses(model, nb, eps_theta)
    gain = posterior_gain(model.schedule, nb.t, nb.t - 1, nb.x_t).flatten()
    torch.testing.assert_close(noise, paper / gain.pow(2), rtol=1e-5, atol=0)
    # on the noise MSE's scale up to the encoder's gain (paper: 1e-5 of it)
    from ncppo.diffusion import diffusion_loss
    ratio = (noise / diffusion_loss(nb.eps, eps_theta)).median().item()
    assert 1e-3 < ratio < 1e3 and (paper / diffusion_loss(nb.eps, eps_theta)).median().item() < 1e-2


def test_uniform_encoder_timestep_is_shared_within_a_pair(model):
    pairs = model.encode_batch(random_pairs(batch_size=4))
    nb = noise_pairs(model, pairs, True, torch.Generator().manual_seed(0))
    t_enc, _, _ = make_objective("ncp-dpo", encoder_timestep="uniform").space._encoder_inputs(model, nb)
    assert torch.equal(t_enc[:4], t_enc[4:]) and len(set(t_enc[:4].tolist())) > 1


def test_a_tie_gives_the_same_loss_with_its_images_swapped(model):
    perturb_lora(model.unet, scale=0.05)
    raw = random_pairs(batch_size=2)
    pairs = model.encode_batch(raw, torch.Generator().manual_seed(1))  # latents fixed: the VAE samples once
    batch = PreferenceBatch(latents_w=pairs.latents_w, latents_l=pairs.latents_l, prompts=raw.prompts,
                            is_tie=torch.tensor([True, True]))
    swapped = batch.replace(latents_w=batch.latents_l, latents_l=batch.latents_w)
    for name in ("dpo", "ncp-dpo", "cpo"):  # a beta large enough that the argument is far from 0
        objective = make_objective(name, beta=5e5, scale="noise")
        losses = [training_step(model, objective, b, generator=torch.Generator().manual_seed(7)).loss.item()
                  for b in (batch, swapped)]
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-9)
        decisive = training_step(model, objective, batch.replace(is_tie=None), generator=torch.Generator().manual_seed(7))
        assert decisive.loss.item() != pytest.approx(losses[0], rel=1e-3)
    with pytest.raises(ValueError, match="cannot use ties"):
        training_step(model, make_objective("sft"), batch, generator=torch.Generator().manual_seed(7))


def test_beta_auto_puts_the_ncp_argument_on_noise_dpo_scale(model):
    from ncppo.calibration import calibrate_beta

    batches = [random_pairs(seed=s) for s in range(2)]
    gens = lambda: [torch.Generator().manual_seed(10 + s) for s in range(2)]  # noqa: E731
    dpo, record = calibrate_beta(model, make_objective("dpo", beta="auto"), batches, gens())
    assert dpo.preference.beta == pytest.approx(5000.0) and record["noise_over_space"] == pytest.approx(1.0)
    ncp, record = calibrate_beta(model, make_objective("ncp-dpo", beta="auto", scale="paper"), batches, gens())
    assert record["beta"] == ncp.preference.beta > 1e6  # paper scale: PL is ~1e-5 of the noise MSE
    again, _ = calibrate_beta(model, make_objective("ncp-dpo", beta="auto", scale="paper"), batches, gens())
    assert again.preference.beta == ncp.preference.beta  # deterministic: a resumed run recomputes it exactly
    perturb_lora(model.unet, scale=0.05)
    rms = {name: training_step(model, o, batches[0], generator=torch.Generator().manual_seed(3)).metrics["argument_rms"].item()
           for name, o in (("dpo", dpo), ("ncp", ncp), ("paper", make_objective("ncp-dpo", scale="paper")),
                           ("default", make_objective("ncp-dpo")))}
    assert 0.01 < rms["ncp"] / rms["dpo"] < 100 and rms["paper"] / rms["dpo"] < 1e-3
    assert 0.01 < rms["default"] / rms["dpo"] < 100  # the default scale needs no calibration to leave log 2


def test_fp32_encoder_under_half_precision_weights(model):
    """encoder_dtype='fp32' runs f on a float32 copy when the frozen U-Net is in bf16 (autocast on).
    beta is small so that no pair saturates: the cosine then measures precision alone."""
    perturb_lora(model.unet, scale=0.05)
    batch = random_pairs()
    _, g32 = _lora_grad(model, make_objective("ncp-dpo", beta=100.0, scale="noise"), batch)
    model.set_frozen_dtype(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = training_step(model, make_objective("ncp-dpo", beta=100.0, scale="noise", encoder_dtype="fp32"), batch,
                            generator=torch.Generator().manual_seed(4))
    model.unet.zero_grad(set_to_none=True)
    out.loss.backward()
    g = torch.cat([p.grad.flatten() for p in model.trainable_parameters()])
    assert model._fp32_encoder is not None and next(model._fp32_encoder.parameters()).dtype == torch.float32
    assert len(model._fp32_encoder.up_blocks) == 0
    cos_fp32_encoder = torch.nn.functional.cosine_similarity(g.double(), g32.double(), dim=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the paper's path in bf16 loses the signal: the check can fail
        out = training_step(model, make_objective("ncp-dpo", beta=100.0, scale="noise", distance="exact"), batch,
                            generator=torch.Generator().manual_seed(4))
    model.unet.zero_grad(set_to_none=True)
    out.loss.backward()
    g_half = torch.cat([p.grad.flatten() for p in model.trainable_parameters()])
    cos_paper = torch.nn.functional.cosine_similarity(g_half.double(), g32.double(), dim=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the default distance in half precision: linear
        out = training_step(model, make_objective("ncp-dpo", beta=100.0, scale="noise"), batch,
                            generator=torch.Generator().manual_seed(4))
    model.unet.zero_grad(set_to_none=True)
    out.loss.backward()
    g_linear = torch.cat([p.grad.flatten() for p in model.trainable_parameters()])
    cos_linear = torch.nn.functional.cosine_similarity(g_linear.double(), g32.double(), dim=0)
    assert cos_fp32_encoder > 0.99 > cos_paper and cos_linear > 0.99
