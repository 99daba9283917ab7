import math

import pytest
import torch

from ncppo.objectives import CPO, DPO, OBJECTIVE_NAMES, SFT, PairLosses, make_objective
from ncppo.objectives.spaces import NoiseSpace, PerceptualSpace, parse_encoder_timestep

LOSSES = PairLosses(
    policy_w=torch.tensor([0.10, 0.30]),
    policy_l=torch.tensor([0.20, 0.25]),
    reference_w=torch.tensor([0.12, 0.30]),
    reference_l=torch.tensor([0.18, 0.20]),
)


def _logsig(x):
    return -math.log(1 + math.exp(-x))


def test_sft_is_mean_winner_loss():
    loss, metrics = SFT()(LOSSES)
    assert loss.item() == pytest.approx(0.2)
    assert metrics["loss_w_policy"].item() == pytest.approx(0.2)


def test_dpo_hand_computed():
    beta = 100.0
    loss, m = DPO(beta=beta)(LOSSES)
    # pair 0: (0.10-0.12) - (0.20-0.18) = -0.04 ; pair 1: (0.30-0.30) - (0.25-0.20) = -0.05
    insides = [-(beta / 2) * -0.04, -(beta / 2) * -0.05]
    expected = -sum(_logsig(x) for x in insides) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert m["implicit_acc"].item() == 1.0
    assert m["reward_margin"].item() == pytest.approx(sum(insides) / 2, rel=1e-5)
    for key, value in [("loss_w_policy", 0.2), ("loss_l_policy", 0.225), ("loss_w_reference", 0.21),
                       ("loss_l_reference", 0.19)]:
        assert m[key].item() == pytest.approx(value)


def test_dpo_equals_log2_when_policy_is_reference():
    same = PairLosses(LOSSES.policy_w, LOSSES.policy_l, LOSSES.policy_w, LOSSES.policy_l)
    loss, m = DPO()(same)
    assert loss.item() == pytest.approx(math.log(2))
    assert m["implicit_acc"].item() == 0.5  # ties count half


def test_cpo_hand_computed_with_behaviour_cloning():
    beta, lam = 10.0, 0.5
    loss, m = CPO(beta=beta, lam=lam)(LOSSES)
    insides = [-(beta / 2) * (0.10 - 0.20), -(beta / 2) * (0.30 - 0.25)]
    preference = -sum(_logsig(x) for x in insides) / 2
    assert m["preference_loss"].item() == pytest.approx(preference, rel=1e-5)
    assert m["bc_loss"].item() == pytest.approx(0.2)
    assert loss.item() == pytest.approx(preference + lam * 0.2, rel=1e-5)
    assert m["implicit_acc"].item() == 0.5
    loss0, _ = CPO(beta=beta, lam=0.0)(LOSSES)  # the authors' code: no BC term
    assert loss0.item() == pytest.approx(preference, rel=1e-5)


def test_objectives_refuse_missing_losses():
    with pytest.raises(ValueError, match="DPO needs.*reference_w"):
        DPO()(PairLosses(LOSSES.policy_w, LOSSES.policy_l))
    with pytest.raises(ValueError, match="CPO needs.*policy_l"):
        CPO()(PairLosses(LOSSES.policy_w))


def test_from_stacked_splits_winners_and_losers():
    stacked = torch.arange(6.0)
    pl = PairLosses.from_stacked(stacked, stacked * 2, 3)
    assert pl.policy_w.tolist() == [0, 1, 2] and pl.policy_l.tolist() == [3, 4, 5]
    assert pl.reference_l.tolist() == [6, 8, 10]
    assert PairLosses.from_stacked(stacked[:3], None, 3).policy_l is None
    with pytest.raises(ValueError):
        PairLosses.from_stacked(stacked[:4], None, 3)


def test_registry_builds_the_six_methods():
    assert OBJECTIVE_NAMES == ("sft", "dpo", "cpo", "ncp-sft", "ncp-dpo", "ncp-cpo")
    needs = {n: make_objective(n).needs_reference_prediction for n in OBJECTIVE_NAMES}
    assert needs == {"sft": False, "dpo": True, "cpo": False, "ncp-sft": False, "ncp-dpo": True, "ncp-cpo": False}
    assert not make_objective("sft").uses_loser and make_objective("ncp-cpo").uses_loser
    assert isinstance(make_objective("dpo").space, NoiseSpace)
    ncp = make_objective("ncp-dpo", beta=2500, features="all", encoder_timestep="t-5")
    assert isinstance(ncp.space, PerceptualSpace) and ncp.needs_frozen_unet
    assert ncp.preference.beta == 2500 and ncp.space.encoder.features == "all"
    assert make_objective("cpo").preference.beta == 5000  # METHOD.md's convention
    assert make_objective("cpo", cpo_lambda=0).preference.lam == 0


def test_unknown_objective_suggests_a_name():
    with pytest.raises(ValueError, match="Did you mean 'ncp-dpo'"):
        make_objective("ncp_dpo")
    with pytest.raises(ValueError, match="unknown perceptual feature choice"):
        make_objective("ncp-sft", features="first")


def test_encoder_timestep_spec():
    assert parse_encoder_timestep("t-1") == 1 and parse_encoder_timestep("t-5") == 5
    assert parse_encoder_timestep("uniform") is None
    for bad in ("t", "t-0", "t+1", "5"):
        with pytest.raises(ValueError, match="encoder timestep"):
            parse_encoder_timestep(bad)


TIE = torch.tensor([True, False])


@pytest.mark.parametrize("objective", [DPO(beta=100.0), CPO(beta=100.0, lam=0.5)])
def test_a_tie_is_symmetric_in_its_two_images(objective):
    """Swapping the images of a tie leaves the loss unchanged; swapping a decisive pair does not."""
    tied = PairLosses(LOSSES.policy_w, LOSSES.policy_l, LOSSES.reference_w, LOSSES.reference_l, TIE)
    swap = torch.tensor([0])
    def swapped(which):
        pw, pl, rw, rl = (x.clone() for x in (LOSSES.policy_w, LOSSES.policy_l, LOSSES.reference_w, LOSSES.reference_l))
        pw[which], pl[which], rw[which], rl[which] = LOSSES.policy_l[which], LOSSES.policy_w[which], \
            LOSSES.reference_l[which], LOSSES.reference_w[which]
        return PairLosses(pw, pl, rw, rl, TIE)
    assert objective(swapped(swap))[0].item() == pytest.approx(objective(tied)[0].item(), abs=1e-7)
    assert objective(swapped(torch.tensor([1])))[0].item() != pytest.approx(objective(tied)[0].item(), abs=1e-4)
    # without the tie flag the same losses give the decisive loss
    assert objective(LOSSES)[0].item() != pytest.approx(objective(tied)[0].item(), abs=1e-4)


def test_tie_loss_is_label_smoothed_dpo_by_hand():
    beta = 100.0
    tied = PairLosses(LOSSES.policy_w, LOSSES.policy_l, LOSSES.reference_w, LOSSES.reference_l, TIE)
    x0, x1 = -(beta / 2) * -0.04, -(beta / 2) * -0.05
    expected = (-(_logsig(x0) + _logsig(-x0)) / 2 - _logsig(x1)) / 2
    assert DPO(beta=beta)(tied)[0].item() == pytest.approx(expected, rel=1e-5)


def test_sft_refuses_ties():
    with pytest.raises(ValueError, match="cannot use ties"):
        SFT()(PairLosses(LOSSES.policy_w, LOSSES.policy_l, tie=TIE))


def test_argument_diagnostics():
    _, m = DPO(beta=1000.0)(LOSSES)
    inside = torch.tensor([-(1000 / 2) * -0.04, -(1000 / 2) * -0.05])  # 20, 25: both saturated
    assert m["argument_rms"].item() == pytest.approx(inside.pow(2).mean().sqrt().item(), rel=1e-5)
    assert m["saturated_frac"].item() == 1.0
    _, m = DPO(beta=10.0)(LOSSES)
    assert m["saturated_frac"].item() == 0.0


def test_objective_options_are_checked_with_their_choices():
    for option, bad, words in [("scale", "loud", "paper, noise"), ("distance", "cosine", "exact, linear"),
                               ("encoder_dtype", "fp8", "model, fp32"), ("level_norm", "batch", "none.*channels.*target"),
                               ("encoder_timestep", "t+1", "t-k")]:
        with pytest.raises(ValueError, match=words):
            make_objective("ncp-dpo", **{option: bad})
    with pytest.raises(ValueError, match="has none"):
        make_objective("ncp-sft", beta="auto")
    with pytest.raises(ValueError, match="number or 'auto'"):
        make_objective("ncp-dpo", beta="atuo")
    objective = make_objective("ncp-dpo", beta="auto")
    assert objective.needs_calibration
    with pytest.raises(ValueError, match="not been calibrated"):
        objective.preference(LOSSES)
    calibrated = objective.with_beta(123.0)
    assert not calibrated.needs_calibration and calibrated.preference.beta == 123.0


def test_auto_distance_is_exact_in_float32_and_linear_in_half_precision():
    space = make_objective("ncp-dpo", distance="auto").space
    from types import SimpleNamespace

    unet32, unet16 = SimpleNamespace(dtype=torch.float32), SimpleNamespace(dtype=torch.float16)
    x = torch.zeros(1)
    assert space._distance(unet32, x) == "exact"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert space._distance(unet32, x) == "linear"
        with torch.autocast("cpu", enabled=False):  # the fp32 encoder turns autocast off
            assert space._distance(unet32, x) == "exact"
    assert space._distance(unet16, x) == "linear"
    assert make_objective("ncp-dpo", distance="exact").space._distance(unet16, x) == "exact"


@pytest.mark.parametrize("value, word", [(0.0, "zero"), (math.nan, "non-finite"), (math.inf, "non-finite")])
def test_calibration_refuses_a_zero_or_nonfinite_loss_naming_the_batch(monkeypatch, value, word):
    import contextlib

    from ncppo.calibration import calibrate_beta
    from ncppo.errors import StateError

    objective = make_objective("ncp-dpo", beta="auto")
    monkeypatch.setattr(type(objective.space), "losses", lambda self, model, batch, eps, ref=None: (eps[:, 0, 0, 0] * 0 + value, None))

    class Model:  # the least a model must offer calibrate_beta
        def __init__(self):
            from ncppo.diffusion import NoiseSchedule

            self.schedule = NoiseSchedule(torch.linspace(1e-4, 0.02, 10), torch.cumprod(1 - torch.linspace(1e-4, 0.02, 10), 0))
            self.frozen_unet = lambda: contextlib.nullcontext(None)

        def predict_epsilon(self, unet, x_t, t, condition):
            return torch.zeros_like(x_t)

    from ncppo.batch import Condition, EncodedPairs

    pairs = EncodedPairs(torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2), Condition(torch.zeros(2, 1, 1)),
                         Condition(torch.zeros(2, 1, 1)), ids=["row 7", "row 9"])
    with pytest.raises(StateError, match=rf"calibration batch 0 \(pair ids \['row 7', 'row 9'\]\) gives a {word} ncp-dpo loss"):
        calibrate_beta(Model(), objective, [pairs], [torch.Generator().manual_seed(0)])


# -- the six objectives on a flow-matching model (a U-Net under FlowMatchEulerDiscreteScheduler: flow without a
# transformer; the step and the spaces never ask which) --------------------------------------------------------
@pytest.fixture(scope="module")
def flow_model():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ncppo.models.preference_model import LoraSettings, PreferenceModel
    from ncppo.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd15")
    pipe.register_modules(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return PreferenceModel(pipe, lora=LoraSettings(rank=4))


def _flow_batch(model, seed=0):
    from .conftest import noised_random_pairs

    return noised_random_pairs(model, seed)


def test_a_flow_models_process_is_flow_matching(flow_model):
    from ncppo.flow import FlowSchedule

    assert isinstance(flow_model.schedule, FlowSchedule) and flow_model.schedule.shift == 3.0
    nb = _flow_batch(flow_model)
    s = flow_model.schedule.sigma(nb.t, nb.x0)
    torch.testing.assert_close(nb.x_t, (1 - s) * nb.x0 + s * nb.eps)
    torch.testing.assert_close(nb.target, nb.eps - nb.x0)


@pytest.mark.parametrize("name", ["dpo", "ncp-dpo", "cpo", "ncp-cpo"])
def test_flow_dpo_is_log2_when_policy_equals_reference(flow_model, name):
    from ncppo.step import training_step

    from .conftest import random_pairs

    objective = make_objective(name, beta=5000.0)
    out = training_step(flow_model, objective, random_pairs(), generator=torch.Generator().manual_seed(0))
    if name.endswith("dpo"):
        assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
        assert out.metrics["reward_margin"].item() == 0.0
    else:  # CPO has no reference: log 2 only if winner and loser losses agree, which they need not
        assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
def test_every_objective_trains_a_flow_model_with_finite_gradients(flow_model, name):
    from ncppo.step import training_step

    from .conftest import perturb_lora, random_pairs

    flow_model.unet.zero_grad(set_to_none=True)
    perturb_lora(flow_model.unet, scale=0.05)
    out = training_step(flow_model, make_objective(name), random_pairs(), generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    grads = [p.grad for n, p in flow_model.unet.named_parameters() if "lora" in n and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert torch.isfinite(out.loss)
    for _, p in flow_model.unet.named_parameters():  # restore the zero-initialised LoRA for the other tests
        if "lora_B" in _:
            p.data.zero_()
    flow_model.unet.zero_grad(set_to_none=True)


def test_flow_noise_space_is_the_velocity_mse(flow_model):
    nb = _flow_batch(flow_model, seed=3)
    v_theta = torch.randn_like(nb.x_t)
    policy, _ = NoiseSpace().losses(flow_model, nb, v_theta)
    torch.testing.assert_close(policy, ((nb.eps - nb.x0) - v_theta).pow(2).flatten(1).mean(1))


def test_flow_ncp_encodes_the_euler_step_to_the_next_lower_sigma(flow_model):
    """PL = || f(x_s + (s'-s) v_theta, s') - f(x^*_{s'}, s') ||^2 / (s - s')^2 with x^*_{s'} on the straight path."""
    from ncppo.perception import NoiseConditionedEncoder

    model, nb = flow_model, _flow_batch(flow_model, seed=4)
    v_theta = nb.target + 0.1 * torch.randn_like(nb.x_t)
    schedule = model.schedule
    s, s_next = schedule.sigma(nb.t, nb.x_t), schedule.sigma(nb.t - 1, nb.x_t)
    x_policy = nb.x_t + (s_next - s) * v_theta
    x_star = (1 - s_next) * nb.x0 + s_next * nb.eps  # the true velocity's Euler step lands on the forward path
    timestep = s_next.flatten() * 1000  # the next lower training sigma, as the network takes it
    enc, cond = NoiseConditionedEncoder(), nb.condition.unet_kwargs()
    with torch.no_grad(), model.perceptual_encoder() as frozen:
        expected = enc.distance(enc(frozen, x_policy, timestep, **cond), enc(frozen, x_star, timestep, **cond))
    expected = expected / (s - s_next).flatten().pow(2)
    with torch.no_grad():
        got, _ = PerceptualSpace(scale="noise").losses(model, nb, v_theta)
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=0)


@pytest.mark.parametrize("encoder_timestep", ["t-5", "uniform"])
def test_flow_ncp_with_a_larger_step_or_a_uniform_encoder_time(flow_model, encoder_timestep):
    from ncppo.step import training_step

    from .conftest import random_pairs

    objective = make_objective("ncp-dpo", encoder_timestep=encoder_timestep)
    out = training_step(flow_model, objective, random_pairs(), generator=torch.Generator().manual_seed(2))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    nb = _flow_batch(flow_model, seed=6)
    v_theta = nb.target + 0.1 * torch.randn_like(nb.x_t)
    with torch.no_grad():
        got, _ = objective.space.losses(flow_model, nb, v_theta)
    assert torch.isfinite(got).all() and (got > 0).all()
    if encoder_timestep == "t-5":  # the Euler step from sigma(t) to sigma(t-5), on the gain's scale
        schedule = flow_model.schedule
        s, s5 = schedule.sigma(nb.t, nb.x_t), schedule.sigma((nb.t - 5).clamp(min=-1), nb.x_t)
        one, _ = PerceptualSpace(scale="paper", encoder_timestep="t-5").losses(flow_model, nb, v_theta)
        torch.testing.assert_close(got, one / (s - s5).flatten().pow(2), rtol=1e-5, atol=0)


# -- 14.2/14.3 on the tiny SD1.5-/SDXL-class models: what the default scale promises, and t-k's inputs ------------
@pytest.fixture
def sd_model(pipeline):
    from ncppo.models.preference_model import LoraSettings, PreferenceModel

    from .conftest import perturb_lora

    model = PreferenceModel(pipeline, lora=LoraSettings(rank=4))
    perturb_lora(model.unet, scale=0.05)  # a policy away from its reference, as after some training
    return model


def test_with_the_default_scale_ncp_dpos_reference_matters(sd_model):
    """NCP-DPO and NCP-CPO (lambda 0) differ only in the reference's term inside the sigmoid. At the paper's
    scale that term is ~1e-5, so their gradients agree to 1e-3 (the reference drops out); at the default
    scale the argument is on noise-space DPO's scale and the reference changes the gradient."""
    from .conftest import random_pairs
    from .test_step import _lora_grad as _lora_gradient

    batch = random_pairs(batch_size=4)
    gap, rms = {}, {}
    for scale in ("paper", None):  # None: the default
        options = {} if scale is None else {"scale": scale}
        dpo, g_dpo = _lora_gradient(sd_model, make_objective("ncp-dpo", **options), batch)
        _, g_cpo = _lora_gradient(sd_model, make_objective("ncp-cpo", cpo_lambda=0.0, **options), batch)
        gap[scale] = ((g_dpo - g_cpo).norm() / g_dpo.norm()).item()
        rms[scale] = dpo.metrics["argument_rms"].item()
    noise_rms = _lora_gradient(sd_model, make_objective("dpo"), batch)[0].metrics["argument_rms"].item()
    assert gap["paper"] < 1e-2 and rms["paper"] < 1e-3
    assert gap[None] > 0.05 and 0.1 < rms[None] / noise_rms < 10


def test_with_the_default_scale_ncp_sft_updates_are_not_eps_dominated(pipeline):
    """After a few AdamW steps (eps 1e-8) the paper's NCP-SFT has most LoRA entries below eps (its gradient
    RMS is ~1e-8); the default scale's has none."""
    import copy

    from ncppo.models.preference_model import LoraSettings, PreferenceModel
    from ncppo.step import training_step
    from ncppo.training.diagnostics import EPS_DOMINATED, eps_dominated_frac

    from .conftest import perturb_lora, random_pairs

    frac = {}
    for scale in ("paper", None):
        model = PreferenceModel(copy.deepcopy(pipeline), lora=LoraSettings(rank=4))
        perturb_lora(model.unet, scale=0.05)
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, eps=1e-8)
        objective = make_objective("ncp-sft", **({} if scale is None else {"scale": scale}))
        for step in range(3):
            optimizer.zero_grad()
            training_step(model, objective, random_pairs(seed=step), generator=torch.Generator().manual_seed(step)
                          ).loss.backward()
            optimizer.step()
        frac[scale] = eps_dominated_frac(optimizer)
    assert frac["paper"] > EPS_DOMINATED > 0.05 > frac[None]


@pytest.mark.parametrize("k", [1, 5])
def test_t_minus_k_encodes_the_exact_posterior_with_the_shared_noise(sd_model, k):
    from ncppo.diffusion import posterior_gain, posterior_sample

    from .conftest import noised_random_pairs

    nb = noised_random_pairs(sd_model, seed=2)
    t_enc, to_input, gain = make_objective("ncp-dpo", encoder_timestep=f"t-{k}").space._encoder_inputs(sd_model, nb)
    s = (nb.t - k).clamp(min=-1)
    assert torch.equal(t_enc, s.clamp(min=0))
    torch.testing.assert_close(gain, posterior_gain(sd_model.schedule, nb.t, s, nb.x_t))
    eps_other = torch.randn(nb.eps.shape, generator=torch.Generator().manual_seed(3))
    for prediction in (nb.eps, eps_other):
        torch.testing.assert_close(to_input(prediction),
                                   posterior_sample(sd_model.schedule, nb.x_t, prediction, nb.t, s, nb.z))


def test_every_objective_option_is_a_config_key_with_the_same_default():
    """Issue 14.3: every option of make_objective is settable from YAML (objective: ...), defaulting alike."""
    import dataclasses
    import inspect

    from ncppo.training.config import ObjectiveConfig

    params = inspect.signature(make_objective).parameters
    fields = {f.name: f.default for f in dataclasses.fields(ObjectiveConfig)}
    for name, param in params.items():
        assert name in fields, f"make_objective's {name!r} cannot be set from a config"
        if param.default is not inspect.Parameter.empty:
            assert fields[name] == param.default, name
    assert set(ObjectiveConfig().options()) == set(params)
