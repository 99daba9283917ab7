"""The difference pass: one forward carrying the reference's activations and the policy's difference from them."""

import copy

import pytest
import torch

from ncppo.errors import UsageError
from ncppo.models.preference_model import LoraSettings, PreferenceModel
from ncppo.models.tiny import build_tiny_pipeline
from ncppo.objectives import make_objective
from ncppo.step import training_step

from .conftest import noised_random_pairs, perturb_lora, random_pairs


def _model(kind, reference_pass="difference", scale=0.05, pipeline=None):
    pipe = pipeline if pipeline is not None else build_tiny_pipeline(kind, image_size=32, seed=0)
    torch.manual_seed(0)  # the LoRA A matrices
    model = PreferenceModel(copy.deepcopy(pipe), lora=LoraSettings(rank=4), reference_pass=reference_pass)
    if scale:
        perturb_lora(model.unet, scale=scale)
    return model


def _both(model, noised):
    model.reference_pass = "difference"
    fused = model.predict_with_reference(noised.x_t, noised.t, noised.condition)
    model.reference_pass = "separate"
    separate = model.predict_with_reference(noised.x_t, noised.t, noised.condition)
    return fused, separate


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "pixel", "sd3", "flux", "pixart"])
def test_the_pass_gives_the_reference_bit_for_bit_and_the_policy_to_float32_rounding(kind):
    model = _model(kind)
    noised = noised_random_pairs(model)
    with torch.no_grad():
        (theta, ref), (theta_sep, ref_sep) = _both(model, noised)
    assert torch.equal(ref, ref_sep.float())  # the reference stream runs exactly the reference pass's ops
    difference = (theta_sep.float() - ref_sep.float()).abs().max()
    assert difference > 1e-3  # the adapters change the output: the comparison below means something
    assert (theta - theta_sep.float()).abs().max() < 1e-4 * max(1.0, float(theta_sep.abs().max()))


def test_a_policy_equal_to_its_reference_has_a_difference_of_exactly_zero(pipeline):
    model = _model(None, scale=0, pipeline=pipeline)  # LoRA B = 0 at init
    noised = noised_random_pairs(model)
    with torch.no_grad():
        theta, ref = model.predict_with_reference(noised.x_t, noised.t, noised.condition)
    assert torch.equal(theta, ref)


@pytest.mark.parametrize("name", ["dpo", "ncp-dpo"])
def test_the_lora_gradient_equals_the_separate_passes_in_float32(pipeline, name):
    grads = {}
    for reference_pass in ("separate", "difference"):
        model = _model(None, reference_pass, pipeline=pipeline)
        out = training_step(model, make_objective(name, beta=500.0), random_pairs(),
                            generator=torch.Generator().manual_seed(3))
        out.loss.backward()
        grads[reference_pass] = torch.cat([p.grad.flatten() for p in model.trainable_parameters()])
    a, b = grads["separate"], grads["difference"]
    assert a.norm() > 0
    # NCP's exact distance (float32's default) subtracts two encoder passes, which amplifies float32 rounding
    assert float((a - b).norm() / a.norm()) < (1e-4 if name == "dpo" else 1e-3)


def test_gradient_checkpointing_recomputes_the_pass_alike(pipeline):
    grads = []
    for checkpointing in (False, True):
        model = _model(None, pipeline=pipeline)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.unet.train()
        out = training_step(model, make_objective("dpo", beta=500.0), random_pairs(),
                            generator=torch.Generator().manual_seed(3))
        out.loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.trainable_parameters()]))
    assert float((grads[0] - grads[1]).norm() / grads[0].norm()) < 1e-5


def _bf16(model):
    """The trainer's bf16 set-up on CPU: frozen weights in bf16, LoRA in float32, autocast."""
    model.set_frozen_dtype(torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_in_bf16_the_difference_is_an_order_of_magnitude_closer_to_float32(pipeline):
    exact = _model(None, pipeline=pipeline, scale=0.02)
    noised = noised_random_pairs(exact)
    with torch.no_grad():
        (theta, ref), _ = _both(exact, noised)
        truth = (theta - ref).double()
        half = _model(None, pipeline=pipeline, scale=0.02)
        with _bf16(half):
            (theta_h, ref_h), (theta_s, ref_s) = _both(half, noised)
    error = lambda d: float((d.double() - truth).norm() / truth.norm())  # noqa: E731
    separate, fused = error(theta_s.float() - ref_s.float()), error(theta_h - ref_h)
    assert separate > 0.2  # two bf16 passes: the difference drowns in rounding (measured 0.69)
    assert fused < separate / 10, (fused, separate)  # measured 0.018


def test_a_difference_pass_needs_lora():
    pipe = build_tiny_pipeline("sd15", image_size=32, seed=0)
    with pytest.raises(UsageError, match="finetune 'lora'"):
        PreferenceModel(pipe, finetune="full", reference_pass="difference")
    with pytest.raises(UsageError, match="unknown reference pass"):
        PreferenceModel(pipe, reference_pass="fused")
    assert PreferenceModel(pipe, finetune="full").resolved_reference_pass() == "separate"  # auto


def test_auto_is_the_difference_pass_for_a_lora_in_bf16_only():
    model = PreferenceModel(build_tiny_pipeline("sd15", image_size=32, seed=0), lora=LoraSettings(rank=4))
    assert model.reference_pass == "auto" and model.resolved_reference_pass() == "separate"  # float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.resolved_reference_pass() == "difference"
    with torch.autocast("cpu", dtype=torch.float16):
        assert model.resolved_reference_pass() == "separate"
    model.set_frozen_dtype(torch.bfloat16)
    assert model.resolved_reference_pass() == "difference"


def test_merged_adapters_are_refused_by_the_difference_pass(pipeline):
    model = _model(None, pipeline=pipeline)
    for layer in model._adapter_layers:
        layer.merge()
    noised = noised_random_pairs(model)
    model.reference_pass = "difference"
    with pytest.raises(UsageError, match="unmerged"):
        model.predict_with_reference(noised.x_t, noised.t, noised.condition)


def test_a_pass_chosen_after_construction_still_carries_the_difference(pipeline):
    model = _model(None, "separate", pipeline=pipeline)
    noised = noised_random_pairs(model)
    model.reference_pass = "difference"  # the hooks are there whatever the model was built with
    with torch.no_grad():
        theta, ref = model.predict_with_reference(noised.x_t, noised.t, noised.condition)
    assert (theta - ref).abs().max() > 1e-3
