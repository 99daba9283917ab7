"""Diffusion math: METHOD.md equations (1)-(3) and prediction-type handling.

Everything here is pure tensor math over a :class:`NoiseSchedule`, batched over a vector of
per-sample timesteps ``t`` (shape ``(N,)``, integers in ``[0, T)``).

- (1) forward process ............ :func:`add_noise`
- (2) DDPM reverse step .......... :func:`reverse_step` (posterior sample, "fixed_small" variance),
  and its k-step form :func:`posterior_sample` ``q(x_s | x_t, x0_hat)`` with :func:`posterior_gain`
- (3) diffusion loss ............. :func:`diffusion_loss`
- prediction types ............... :func:`to_epsilon`, :func:`predicted_x0`
- :class:`Process` ............... what the training step and the loss spaces ask of a model's noising
  process; :class:`NoiseSchedule` is DDPM's, :class:`ncppo.flow.FlowSchedule` flow matching's

Why not ``diffusers.DDPMScheduler.step``: it takes one scalar timestep and draws its own noise;
training needs a different ``t`` per sample and a noise ``z`` shared across predictions. The
schedule itself (betas, alphas_cumprod) is still built by diffusers from the model's config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ncppo.errors import UsageError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class Process(Protocol):
    """A model's noising process, as the step and the loss spaces use it (they never ask which one it is).

    Timesteps are integers ``t`` in ``[0, T)`` on the training grid, per sample; ``t - k`` is ``k`` grid
    steps less noisy. The "noise space" is the space of :meth:`target`: epsilon for DDPM, the velocity
    ``eps - x0`` for flow matching. ``prediction`` is the model's output mapped by :meth:`to_target`.
    """

    num_train_timesteps: int

    def sample_timesteps(self, n: int, *, device=None, generator=None) -> torch.Tensor: ...
    def noise(self, x0, eps, t) -> torch.Tensor: ...  # x_t
    def target(self, x0, eps) -> torch.Tensor: ...  # what the model learns to predict
    def to_target(self, model_output, x_t, t) -> torch.Tensor: ...  # the model's output in target space
    def model_timestep(self, t, like) -> torch.Tensor: ...  # the timestep the network is given
    def step_back(self, x_t, prediction, t, k: int, z) -> torch.Tensor: ...  # x_{t-k} (t-k = -1: x0_hat)
    def step_back_gain(self, t, k: int, like) -> torch.Tensor: ...  # c: step_back(a) - step_back(b) = -c (a - b)
    def renoise(self, x_t, prediction, t, t_new, eps) -> torch.Tensor: ...  # x0_hat noised to t_new
    def renoise_gain(self, t, t_new, like) -> torch.Tensor: ...


@dataclass(frozen=True)
class NoiseSchedule:
    """The discrete DDPM schedule of a model: ``beta_t``, ``alpha_t`` and ``abar_t`` for t in [0, T)."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    clip_sample_range: float | None = None  # SD's schedulers: None (clip_sample=False), as METHOD.md says

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise UsageError(
                f"unknown prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}"
            )
        if self.betas.shape != self.alphas_cumprod.shape or self.betas.ndim != 1:
            raise ValueError("betas and alphas_cumprod must be 1-D tensors of the same length")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """Build the schedule from any diffusers scheduler config (``pipe.scheduler.config``).

        diffusers computes the betas (``scaled_linear``, ``trained_betas``, zero-SNR rescaling, ...),
        so the schedule is exactly the one the model was trained with.
        """
        from diffusers import DDPMScheduler

        config = dict(config)
        ddpm = DDPMScheduler.from_config(config)  # keys DDPM does not know (Euler's, PNDM's) are ignored
        # DDPM's own default is clip_sample=True: clip only when the model's config itself asks for it
        # (Euler, DPM and PNDM configs have no such key and their models were trained without clipping).
        clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", False) else None
        return cls(
            betas=ddpm.betas.to(torch.float32).clone(),
            alphas_cumprod=ddpm.alphas_cumprod.to(torch.float32).clone(),
            prediction_type=ddpm.config.prediction_type,
            clip_sample_range=clip,
        )

    def to(self, device: torch.device | str) -> NoiseSchedule:
        return NoiseSchedule(
            self.betas.to(device), self.alphas_cumprod.to(device), self.prediction_type, self.clip_sample_range
        )

    def sample_timesteps(self, n: int, *, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform ``t ~ U{0, ..., T-1}``, as Diffusion-DPO trains; drawn on the generator's device
        (a CPU generator keeps runs reproducible across devices) and moved to ``device``."""
        draw_on = generator.device if generator is not None else device
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=draw_on).to(device)

    # -- the Process interface: thin names for this module's functions ---------------------------
    def noise(self, x0, eps, t):
        return add_noise(self, x0, eps, t)

    def target(self, x0, eps):
        return eps

    def to_target(self, model_output, x_t, t):
        return to_epsilon(self, model_output, x_t, t)

    def model_timestep(self, t, like):
        return t  # the U-Net takes the integer timestep itself

    def step_back(self, x_t, prediction, t, k: int, z):
        """(2) for ``k = 1``; else the exact posterior ``q(x_{t-k} | x_t, x0_hat)`` (``x0_hat`` below 0)."""
        if k == 1:
            return reverse_step(self, x_t, prediction, t, z)
        return posterior_sample(self, x_t, prediction, t, (t - k).clamp(min=-1), z)

    def step_back_gain(self, t, k: int, like):
        return posterior_gain(self, t, (t - k).clamp(min=-1), like)

    def renoise(self, x_t, prediction, t, t_new, eps):
        return add_noise(self, predicted_x0(self, x_t, prediction, t).to(x_t.dtype), eps, t_new)

    def renoise_gain(self, t, t_new, like):
        return renoise_gain(self, t, t_new, like)

    # -- per-sample coefficients, broadcast to the sample's shape ---------------------------------
    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``abar_t`` gathered per sample; ``t = -1`` gives ``abar_{-1} = 1``."""
        check_timesteps(t, like, self.num_train_timesteps)
        table = self.alphas_cumprod.to(device=like.device)
        values = torch.where(t >= 0, table[t.clamp(min=0)], torch.ones((), device=like.device))
        return values.to(torch.float32).view(-1, *([1] * (like.ndim - 1)))


def check_timesteps(t: torch.Tensor, sample: torch.Tensor, num_train_timesteps: int) -> None:
    if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.dtype.is_floating_point:
        raise ValueError("timesteps must be a 1-D integer tensor with one entry per sample")
    if t.shape[0] != sample.shape[0]:
        raise ValueError(f"got {t.shape[0]} timesteps for a batch of {sample.shape[0]} samples")
    if t.numel() and (int(t.max()) >= num_train_timesteps or int(t.min()) < -1):
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}); got {t.min()}..{t.max()}")


def _math(x: torch.Tensor) -> torch.Tensor:
    # Half-precision latents lose the small coefficients near t=0: do the arithmetic in float32.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def add_noise(schedule: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1) ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``."""
    abar = schedule.abar(t, x0)
    out = abar.sqrt() * _math(x0) + (1 - abar).sqrt() * _math(eps)
    return out.to(x0.dtype)


def predicted_x0(
    schedule: NoiseSchedule, x_t: torch.Tensor, eps_hat: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """``x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)``, clipped only if the config clips."""
    abar = schedule.abar(t, x_t)
    x0_hat = (_math(x_t) - (1 - abar).sqrt() * _math(eps_hat)) / abar.sqrt()
    if schedule.clip_sample_range is not None:
        x0_hat = x0_hat.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    return x0_hat


def reverse_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    eps_hat: torch.Tensor,
    t: torch.Tensor,
    variance_noise: torch.Tensor,
) -> torch.Tensor:
    """(2) One DDPM posterior sample ``x_{t-1}`` per sample, each at its own ``t``.

    ``mean = sqrt(abar_{t-1}) beta_t / (1-abar_t) x0_hat + sqrt(alpha_t) (1-abar_{t-1}) / (1-abar_t) x_t``,
    ``x_{t-1} = mean + sigma_t z`` with ``sigma_t^2 = beta_t (1-abar_{t-1}) / (1-abar_t)`` and ``sigma_0 = 0``.
    Equals ``DDPMScheduler.step(...).prev_sample`` when that draws the same ``variance_noise``.
    """
    if variance_noise.shape != x_t.shape or eps_hat.shape != x_t.shape:
        raise ValueError(
            f"x_t {tuple(x_t.shape)}, eps_hat {tuple(eps_hat.shape)} and variance_noise "
            f"{tuple(variance_noise.shape)} must have the same shape"
        )
    abar_t = schedule.abar(t, x_t)
    abar_prev = schedule.abar(t - 1, x_t)
    alpha_t = abar_t / abar_prev  # as diffusers: robust to schedules whose betas were rescaled
    beta_t = 1 - alpha_t
    x0_hat = predicted_x0(schedule, x_t, eps_hat, t)
    mean = (abar_prev.sqrt() * beta_t / (1 - abar_t)) * x0_hat + (
        alpha_t.sqrt() * (1 - abar_prev) / (1 - abar_t)
    ) * _math(x_t)
    variance = (beta_t * (1 - abar_prev) / (1 - abar_t)).clamp(min=1e-20)
    has_noise = (t > 0).view(-1, *([1] * (x_t.ndim - 1)))  # sigma_0 = 0: the last step adds no noise
    sigma = torch.where(has_noise, variance.sqrt(), torch.zeros_like(variance))
    return (mean + sigma * _math(variance_noise)).to(x_t.dtype)


def _posterior_coefficients(schedule: NoiseSchedule, t: torch.Tensor, s: torch.Tensor, like: torch.Tensor):
    abar_t, abar_s = schedule.abar(t, like), schedule.abar(s, like)
    ratio = abar_t / abar_s  # abar_t / abar_s = prod_{s < r <= t} alpha_r
    coef_x0 = abar_s.sqrt() * (1 - ratio) / (1 - abar_t)
    coef_xt = ratio.sqrt() * (1 - abar_s) / (1 - abar_t)
    variance = ((1 - ratio) * (1 - abar_s) / (1 - abar_t)).clamp(min=1e-20)
    return abar_t, coef_x0, coef_xt, variance


def posterior_sample(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    eps_hat: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    variance_noise: torch.Tensor,
) -> torch.Tensor:
    """A sample of the exact posterior ``q(x_s | x_t, x0_hat)`` for ``-1 <= s < t``, each sample at its own pair.

    ``mean = sqrt(abar_s) (1 - abar_t/abar_s) / (1-abar_t) x0_hat + sqrt(abar_t/abar_s) (1-abar_s) / (1-abar_t) x_t``,
    ``var = (1 - abar_t/abar_s) (1-abar_s) / (1-abar_t)`` (zero at ``s = -1``). ``s = t - 1`` is
    :func:`reverse_step`; ``s = t - k`` is the k-step jump on ``t-1``'s scale (METHOD.md, "encoder timestep").
    """
    if bool((s >= t).any()) or bool((s < -1).any()):
        raise ValueError("posterior_sample needs -1 <= s < t for every sample")
    _, coef_x0, coef_xt, variance = _posterior_coefficients(schedule, t, s, x_t)
    x0_hat = predicted_x0(schedule, x_t, eps_hat, t)
    has_noise = (s >= 0).view(-1, *([1] * (x_t.ndim - 1)))
    sigma = torch.where(has_noise, variance.sqrt(), torch.zeros_like(variance))
    return (coef_x0 * x0_hat + coef_xt * _math(x_t) + sigma * _math(variance_noise)).to(x_t.dtype)


def posterior_gain(schedule: NoiseSchedule, t: torch.Tensor, s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``c`` with ``posterior_sample(eps_a) - posterior_sample(eps_b) = -c (eps_a - eps_b)`` (same ``x_t``, ``z``).

    ``c = sqrt(abar_s) (1 - abar_t/abar_s) / (sqrt(abar_t) sqrt(1-abar_t))``; for ``s = t-1`` it is
    ``beta_t / (sqrt(alpha_t) sqrt(1-abar_t))`` (METHOD.md, "Scale and precision"). Exact without clipping.
    """
    abar_t, coef_x0, _, _ = _posterior_coefficients(schedule, t, s, like)
    return coef_x0 * ((1 - abar_t) / abar_t).sqrt()


def renoise_gain(schedule: NoiseSchedule, t: torch.Tensor, t_new: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``c`` for re-noising ``x0_hat`` to ``t_new`` with a shared noise: ``sqrt(abar_new (1-abar_t) / abar_t)``."""
    abar_t, abar_new = schedule.abar(t, like), schedule.abar(t_new, like)
    return (abar_new * (1 - abar_t) / abar_t).sqrt()


def to_epsilon(
    schedule: NoiseSchedule,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    prediction_type: str | None = None,
) -> torch.Tensor:
    """Convert a model output to a noise prediction ``eps_hat`` (METHOD.md: v-prediction first becomes epsilon).

    - ``epsilon``: unchanged.
    - ``v_prediction``: ``v = sqrt(abar) eps - sqrt(1-abar) x0``  =>  ``eps = sqrt(abar) v + sqrt(1-abar) x_t``.
    - ``sample``: ``eps = (x_t - sqrt(abar) x0_hat) / sqrt(1-abar)``.
    """
    kind = prediction_type or schedule.prediction_type
    if kind == "epsilon":
        return model_output
    abar = schedule.abar(t, x_t)
    if kind == "v_prediction":
        eps = abar.sqrt() * _math(model_output) + (1 - abar).sqrt() * _math(x_t)
    elif kind == "sample":
        eps = (_math(x_t) - abar.sqrt() * _math(model_output)) / (1 - abar).sqrt()
    else:
        raise UsageError(f"unknown prediction_type {kind!r}; expected one of {PREDICTION_TYPES}")
    return eps.to(model_output.dtype)


def diffusion_loss(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """(3) ``|| eps - eps_theta ||^2`` reduced per sample as the mean over all non-batch dims -> shape ``(N,)``."""
    if target.shape != prediction.shape:
        raise ValueError(f"target {tuple(target.shape)} and prediction {tuple(prediction.shape)} differ in shape")
    return (_math(prediction) - _math(target)).pow(2).flatten(1).mean(dim=1)
