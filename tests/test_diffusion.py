import pytest
import torch
from diffusers import DDPMScheduler

from ncppo.diffusion import (
    NoiseSchedule,
    add_noise,
    diffusion_loss,
    predicted_x0,
    reverse_step,
    to_epsilon,
)
from ncppo.models.tiny import SD_SCHEDULER_CONFIG


@pytest.fixture
def ddpm():
    return DDPMScheduler.from_config(SD_SCHEDULER_CONFIG)


@pytest.fixture
def schedule(ddpm):
    return NoiseSchedule.from_scheduler_config(ddpm.config)


def test_schedule_matches_diffusers(ddpm, schedule):
    assert schedule.num_train_timesteps == 1000
    torch.testing.assert_close(schedule.alphas_cumprod, ddpm.alphas_cumprod.float())
    torch.testing.assert_close(schedule.betas, ddpm.betas.float())
    assert schedule.clip_sample_range is None


def test_schedule_reads_other_scheduler_configs():
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG, prediction_type="v_prediction")
    s = NoiseSchedule.from_scheduler_config(euler.config)
    assert s.prediction_type == "v_prediction"
    torch.testing.assert_close(s.alphas_cumprod, euler.alphas_cumprod.float())


def test_add_noise_matches_diffusers(ddpm, schedule):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    torch.testing.assert_close(add_noise(schedule, x0, eps, t), ddpm.add_noise(x0, eps, t), atol=1e-6, rtol=0)


@pytest.mark.parametrize("t", [0, 1, 2, 3, 10, 100, 250, 500, 750, 990, 998, 999])
def test_reverse_step_matches_ddpm_scheduler(ddpm, schedule, t):
    g = torch.Generator().manual_seed(t)
    x_t, eps_hat = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    expected = ddpm.step(eps_hat, t, x_t, generator=torch.Generator().manual_seed(123)).prev_sample
    # diffusers draws its variance noise with randn from the generator: draw the same z
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(123))
    got = reverse_step(schedule, x_t, eps_hat, torch.full((3,), t), z)
    assert (got - expected).abs().max().item() <= 2e-4


def test_reverse_step_is_batched_over_per_sample_timesteps(ddpm, schedule):
    g = torch.Generator().manual_seed(0)
    ts = torch.tensor([0, 1, 37, 999, 500])
    x_t, eps_hat, z = (torch.randn(5, 4, 8, 8, generator=g) for _ in range(3))
    got = reverse_step(schedule, x_t, eps_hat, ts, z)
    for i, t in enumerate(ts.tolist()):
        single = reverse_step(schedule, x_t[i : i + 1], eps_hat[i : i + 1], torch.tensor([t]), z[i : i + 1])
        torch.testing.assert_close(got[i : i + 1], single)
    # t = 0 adds no noise: the result does not depend on z
    other = reverse_step(schedule, x_t, eps_hat, ts, torch.zeros_like(z))
    torch.testing.assert_close(got[0], other[0])
    assert not torch.allclose(got[1], other[1])


def test_reverse_step_with_true_noise_at_t0_returns_x0(schedule):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.zeros(2, dtype=torch.long)
    x_t = add_noise(schedule, x0, eps, t)
    torch.testing.assert_close(reverse_step(schedule, x_t, eps, t, torch.randn_like(x0)), x0, atol=1e-4, rtol=0)


def test_to_epsilon_inverts_each_prediction_type(schedule):
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([3, 200, 600, 999])
    x_t = add_noise(schedule, x0, eps, t)
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0  # diffusers' get_velocity
    torch.testing.assert_close(to_epsilon(schedule, v, x_t, t, "v_prediction"), eps, atol=1e-4, rtol=0)
    torch.testing.assert_close(to_epsilon(schedule, x0, x_t, t, "sample"), eps, atol=2e-3, rtol=0)
    assert to_epsilon(schedule, eps, x_t, t, "epsilon") is eps
    torch.testing.assert_close(predicted_x0(schedule, x_t, eps, t), x0, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="prediction_type"):
        to_epsilon(schedule, eps, x_t, t, "flow")


def test_v_prediction_matches_diffusers_velocity(ddpm, schedule):
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 400, 900])
    v = ddpm.get_velocity(x0, eps, t)
    torch.testing.assert_close(to_epsilon(schedule, v, add_noise(schedule, x0, eps, t), t, "v_prediction"),
                               eps, atol=1e-4, rtol=0)


def test_diffusion_loss_is_per_sample_mean():
    target = torch.zeros(2, 1, 2, 2)
    pred = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    torch.testing.assert_close(diffusion_loss(target, pred), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        diffusion_loss(target, pred[:, :, :1])


def test_bad_timesteps_are_rejected(schedule):
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="3 timesteps for a batch of 2"):
        add_noise(schedule, x, x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        add_noise(schedule, x, x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="integer"):
        add_noise(schedule, x, x, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="same shape"):
        reverse_step(schedule, x, x, torch.tensor([1, 2]), x[:, :2])


def test_schedule_without_clip_sample_key_does_not_clip():
    """DDPM's own default is clip_sample=True; a config without the key (Euler, DPM, PNDM) must not clip."""
    config = {k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "clip_sample"}
    assert NoiseSchedule.from_scheduler_config(config).clip_sample_range is None
    clipping = NoiseSchedule.from_scheduler_config({**SD_SCHEDULER_CONFIG, "clip_sample": True, "clip_sample_range": 2.0})
    assert clipping.clip_sample_range == 2.0


def test_posterior_sample_one_step_is_the_reverse_step(schedule):
    from ncppo.diffusion import posterior_sample

    g = torch.Generator().manual_seed(3)
    x_t, eps, z = (torch.randn(4, 3, 5, 5, generator=g) for _ in range(3))
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(posterior_sample(schedule, x_t, eps, t, t - 1, z), reverse_step(schedule, x_t, eps, t, z))


def test_posterior_sample_k_steps_is_the_exact_posterior(schedule):
    """q(x_s | x_t, x0): the Gaussian whose mean and variance follow from the forward process (Bayes)."""
    from ncppo.diffusion import posterior_sample

    t, s = torch.tensor([400]), torch.tensor([395])
    abar_t, abar_s = schedule.alphas_cumprod[400].double(), schedule.alphas_cumprod[395].double()
    x0 = torch.randn(1, 1, 2, 2)
    eps = torch.randn_like(x0)
    x_t = add_noise(schedule, x0, eps, t)
    zero = posterior_sample(schedule, x_t, eps, t, s, torch.zeros_like(x0)).double()
    one = posterior_sample(schedule, x_t, eps, t, s, torch.ones_like(x0)).double()
    # Bayes: x_t | x_s ~ N(sqrt(a) x_s, 1 - a), x_s | x0 ~ N(sqrt(abar_s) x0, 1 - abar_s), a = abar_t / abar_s
    a = abar_t / abar_s
    precision = 1 / (1 - abar_s) + a / (1 - a)
    mean = (abar_s.sqrt() * x0.double() / (1 - abar_s) + a.sqrt() * x_t.double() / (1 - a)) / precision
    torch.testing.assert_close(zero, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((one - zero).mean(), (1 / precision).sqrt(), rtol=1e-4, atol=1e-6)


def test_gains_are_the_exact_ratio_of_input_differences(schedule):
    """x^a - x^b = -c (eps_a - eps_b) for the reverse step, k-step posterior and re-noising (no clipping)."""
    from ncppo.diffusion import posterior_gain, posterior_sample, renoise_gain

    g = torch.Generator().manual_seed(5)
    x_t, e_a, e_b, z = (torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0, 3, 500, 999])
    for k in (1, 5):
        s = (t - k).clamp(min=-1)
        diff = posterior_sample(schedule, x_t, e_a, t, s, z) - posterior_sample(schedule, x_t, e_b, t, s, z)
        c = posterior_gain(schedule, t, s, x_t)
        torch.testing.assert_close(diff, -c * (e_a - e_b), rtol=1e-4, atol=1e-9)
    # c_t = beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)) for one step (METHOD.md)
    beta = schedule.betas[t].double().view(-1, 1, 1, 1)
    abar = schedule.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    torch.testing.assert_close(posterior_gain(schedule, t, t - 1, x_t).double(),
                               beta / ((1 - beta).sqrt() * (1 - abar).sqrt()), rtol=1e-4, atol=1e-9)
    t_new = torch.tensor([10, 10, 900, 0])
    renoise = lambda e: add_noise(schedule, predicted_x0(schedule, x_t, e, t), z, t_new)  # noqa: E731
    torch.testing.assert_close(renoise(e_a) - renoise(e_b), -renoise_gain(schedule, t, t_new, x_t) * (e_a - e_b),
                               rtol=1e-4, atol=1e-9)


def test_x0_hat_is_clamped_only_when_the_scheduler_config_asks(schedule):
    """A freshly built scheduler config (no clip_sample key) never clamps x0_hat; clip_sample: true does."""
    x_t, eps = torch.full((1, 1, 2, 2), 3.0), torch.zeros(1, 1, 2, 2)
    t = torch.tensor([10])
    free = NoiseSchedule.from_scheduler_config({k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "clip_sample"})
    assert predicted_x0(free, x_t, eps, t).min().item() > 3.0  # x_t / sqrt(abar_t): outside [-1, 1], kept
    clipped = NoiseSchedule.from_scheduler_config({**SD_SCHEDULER_CONFIG, "clip_sample": True})
    assert predicted_x0(clipped, x_t, eps, t).max().item() == 1.0


@pytest.mark.parametrize("k", [2, 5])
def test_t_minus_k_is_on_t_minus_1s_scale_unlike_renoising(schedule, k):
    """The k-step posterior moves the encoder input k times as far as one reverse step (gain k c_t), while
    re-noising x0_hat to t-k with the shared eps moves it ~100 times as far (PL 1e4 times larger)."""
    from ncppo.diffusion import posterior_gain, renoise_gain

    t = torch.arange(k, 1000)
    like = torch.zeros(len(t), 1)
    one_step = posterior_gain(schedule, t, t - 1, like).flatten()
    ratio = posterior_gain(schedule, t, t - k, like).flatten() / one_step
    assert 0.95 * k < ratio.min().item() and ratio.max().item() < 1.01 * k
    assert (renoise_gain(schedule, t, t - k, like).flatten() / one_step).median().item() > 50
