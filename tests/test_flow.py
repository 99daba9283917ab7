import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling

from ncppo.errors import UsageError
from ncppo.flow import (
    FlowSchedule,
    add_noise,
    euler_gain,
    euler_step,
    euler_update,
    inference_sigmas,
    predicted_x0,
    resolution_mu,
    velocity_target,
)

T = 1000
LIKE = torch.zeros(1, 4, 8, 8)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_training_grid_is_the_schedulers(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    schedule = FlowSchedule.from_scheduler_config(sched.config)
    assert schedule.shift == shift
    index = torch.arange(T)
    t = T - 1 - index
    like = torch.zeros(T, 1)
    torch.testing.assert_close(schedule.sigma(t, like).flatten(), sched.sigmas, atol=0, rtol=0)
    torch.testing.assert_close(schedule.model_timestep(t, like), sched.timesteps, atol=1e-4, rtol=0)
    assert schedule.sigma(torch.tensor([-1]), torch.zeros(1, 1)).item() == 0.0  # t = -1 is the clean image


def test_dynamic_shift_is_fluxs_time_shift_of_the_unshifted_grid():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    schedule = FlowSchedule.from_scheduler_config(sched.config)
    latents = torch.zeros(3, 16, 64, 48)  # 32 x 24 tokens of 2x2 patches
    mu = calculate_shift(32 * 24, sched.config.base_image_seq_len, sched.config.max_image_seq_len,
                         sched.config.base_shift, sched.config.max_shift)
    assert schedule.mu(latents) == pytest.approx(mu, rel=1e-12)
    t = torch.tensor([999, 500, 3])
    expected = sched.time_shift(mu, 1.0, sched.sigmas[T - 1 - t])  # the init grid is unshifted under dynamic shifting
    torch.testing.assert_close(schedule.sigma(t, latents).flatten(), expected.float(), atol=1e-6, rtol=0)
    # a larger image is shifted towards more noise (below the top, where sigma = 1 for every size)
    assert (schedule.sigma(t[1:], torch.zeros(2, 16, 128, 128)) > schedule.sigma(t[1:], latents[:2])).all()


def test_add_noise_matches_scale_noise_per_sample():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = FlowSchedule.from_scheduler_config(sched.config)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    index = torch.tensor([0, 1, 250, 998, 999])
    expected = sched.scale_noise(x0, sched.timesteps[index], eps)
    got = add_noise(schedule, x0, eps, T - 1 - index)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # batched: each sample at its own sigma equals it alone
    for i in range(5):
        alone = add_noise(schedule, x0[i:i + 1], eps[i:i + 1], (T - 1 - index)[i:i + 1])
        torch.testing.assert_close(got[i:i + 1], alone, atol=0, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_inference_sigmas_and_euler_steps_match_set_timesteps_and_step(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    schedule = FlowSchedule.from_scheduler_config(sched.config)
    sched.set_timesteps(7)
    sigmas = inference_sigmas(schedule, 7)
    torch.testing.assert_close(sigmas, sched.sigmas, atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(1)
    x = ours = torch.randn(2, 4, 8, 8, generator=g)
    for i, timestep in enumerate(sched.timesteps):
        v = torch.randn(x.shape, generator=g)
        x = sched.step(v, timestep, x).prev_sample
        ours = euler_update(ours, v, sigmas[i], sigmas[i + 1])
        torch.testing.assert_close(ours, x, atol=1e-5, rtol=0)


def test_fluxs_inference_sigmas_match_its_pipeline():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    schedule = FlowSchedule.from_scheduler_config(sched.config)
    n, seq_len = 9, 1024
    mu = calculate_shift(seq_len)
    assert resolution_mu(schedule, seq_len) == pytest.approx(mu)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / n, n).tolist(), mu=mu)  # what FluxPipeline passes
    torch.testing.assert_close(inference_sigmas(schedule, n, seq_len), sched.sigmas, atol=1e-6, rtol=0)
    with pytest.raises(UsageError, match="token count"):
        inference_sigmas(schedule, n)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 1.3)])
def test_logit_normal_sampling_is_diffusers_sd3_scripts(mean, std):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = FlowSchedule.from_scheduler_config(sched.config, weighting="logit_normal", logit_mean=mean,
                                                  logit_std=std)
    u = compute_density_for_timestep_sampling("logit_normal", 4096, mean, std, generator=torch.Generator().manual_seed(3))
    index = (u * T).long()
    t = schedule.sample_timesteps(4096, generator=torch.Generator().manual_seed(3))
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) < T
    agree = (schedule.sigma(t, torch.zeros(4096, 1)).flatten() == sched.sigmas[index]).float().mean().item()
    assert agree > 0.999  # the same draws (rounding at a grid boundary may differ)


def test_uniform_sampling_covers_the_grid_evenly():
    schedule = FlowSchedule(weighting="uniform")
    t = schedule.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    quarters = torch.bincount(t * 4 // T, minlength=4).float() / t.numel()
    assert (quarters - 0.25).abs().max().item() < 0.02


def test_euler_step_to_the_next_lower_sigma_and_its_gain():
    schedule = FlowSchedule(shift=3.0)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = add_noise(schedule, x0, eps, t)
    v = velocity_target(x0, eps)
    torch.testing.assert_close(v, eps - x0)
    # the true velocity steps exactly along the straight path: x_{t-1} is the forward process at t-1
    torch.testing.assert_close(euler_step(schedule, x_t, v, t, t - 1), add_noise(schedule, x0, eps, t - 1),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(predicted_x0(schedule, x_t, v, t), x0, atol=1e-5, rtol=0)
    va, vb = torch.randn(2, *x_t.shape, generator=g)
    gain = euler_gain(schedule, t, t - 1, x_t)
    assert (gain > 0).all() and (gain < 0.01).all()  # one training step moves sigma by about 1e-3
    diff = euler_step(schedule, x_t, va, t, t - 1) - euler_step(schedule, x_t, vb, t, t - 1)
    torch.testing.assert_close(diff, -gain * (va - vb), atol=1e-6, rtol=0)
    torch.testing.assert_close(schedule.step_back(x_t, va, t, 3), euler_step(schedule, x_t, va, t, (t - 3).clamp(min=-1)))


def test_renoise_gain():
    schedule = FlowSchedule(shift=3.0)
    g = torch.Generator().manual_seed(4)
    x_t, eps, va, vb = torch.randn(4, 4, 1, 4, 4, generator=g)
    t, t_new = torch.tensor([5, 100, 600, 999]), torch.tensor([900, 3, 600, 0])
    diff = schedule.renoise(x_t, va, t, t_new, eps) - schedule.renoise(x_t, vb, t, t_new, eps)
    torch.testing.assert_close(diff, -schedule.renoise_gain(t, t_new, x_t) * (va - vb), atol=1e-6, rtol=0)


def test_bad_input():
    with pytest.raises(UsageError, match="weighting"):
        FlowSchedule(weighting="mode")
    with pytest.raises(UsageError, match="not supported"):
        FlowSchedule.from_scheduler_config(dict(FlowMatchEulerDiscreteScheduler(invert_sigmas=True).config))
    schedule = FlowSchedule()
    with pytest.raises(ValueError, match="integer"):
        schedule.sigma(torch.tensor([0.5]), torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        schedule.sigma(torch.tensor([1000]), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="s < t"):
        euler_step(schedule, torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([3]), torch.tensor([3]))
    assert math.isclose(schedule.sigma(torch.tensor([999]), torch.zeros(1, 1)).item(), 1.0)
