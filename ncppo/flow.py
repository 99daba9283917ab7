"""Flow-matching math (rectified flow, as SD3 and FLUX.1 train), beside :mod:`ncppo.diffusion`'s DDPM.

Pure tensor math over a :class:`FlowSchedule`, batched over per-sample timesteps. A timestep is an
integer ``t`` in ``[0, T)`` on the scheduler's training grid, as for DDPM, so that "``t-1``" means the
next lower training sigma in both processes; ``t = -1`` is the clean image (``sigma = 0``):

- noise level ................ ``sigma(t) = shift(u)`` with ``u = (t + 1) / T`` (:meth:`FlowSchedule.sigma`):
  ``shift`` is SD3's static ``s u / (1 + (s - 1) u)``, or FLUX's resolution-dependent
  ``e^mu / (e^mu + 1/u - 1)`` with ``mu`` linear in the image's token count (:func:`resolution_mu`)
- forward process ............ ``x_s = (1 - s) x0 + s eps`` (:func:`add_noise`)
- prediction target .......... the velocity ``v = eps - x0`` (:func:`velocity_target`)
- Euler step ................. ``x_{s'} = x_s + (s' - s) v`` (:func:`euler_step`, :func:`euler_update`),
  gain ``s - s'``
- training sampling .......... ``u`` uniform or logit-normal (SD3), mapped to the grid as diffusers'
  training scripts do (:meth:`FlowSchedule.sample_timesteps`)
- inference grid ............. :func:`inference_sigmas` (what ``set_timesteps`` makes, for tests and sampling)

``FlowMatchEulerDiscreteScheduler`` holds one scalar state and steps one timestep for the whole batch;
training needs a different sigma per sample, hence this module. Its grid (``scheduler.sigmas``) is
``sigma(T - 1 - i)`` for index ``i`` (tests check every identity against diffusers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ncppo.diffusion import _math, check_timesteps
from ncppo.errors import UsageError

WEIGHTINGS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class FlowSchedule:
    """A flow-matching model's training grid and timestep sampling (the :class:`~ncppo.diffusion.Process` of a
    flow model: its noise space is velocity space).

    Parameters:
        num_train_timesteps: ``T``, the grid's size (diffusers: 1000).
        shift: SD3's static shift (SD3/SD3.5: 3.0); ignored under ``use_dynamic_shifting``.
        use_dynamic_shifting: FLUX's resolution-dependent shift, ``mu`` from the image's token count.
        base_shift, max_shift, base_image_seq_len, max_image_seq_len: the line ``mu(seq_len)`` (FLUX: 0.5 at
            256 tokens to 1.15 at 4096).
        patch_size: latent pixels per token side, to count tokens (SD3 and FLUX: 2).
        weighting: training sampling of ``u``: ``uniform`` or ``logit_normal`` (SD3's, with ``logit_mean``
            and ``logit_std``; diffusers' SD3/FLUX scripts default to it with 0 and 1).
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    patch_size: int = 2
    weighting: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    prediction_type = "flow"

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise UsageError(f"unknown flow timestep weighting {self.weighting!r}; expected one of {WEIGHTINGS}")
        if self.shift <= 0 or self.logit_std <= 0 or self.num_train_timesteps < 2:
            raise UsageError("flow schedule: shift and logit_std must be > 0 and num_train_timesteps >= 2")

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any], **training) -> FlowSchedule:
        """From a ``FlowMatchEulerDiscreteScheduler`` config; ``training`` sets ``weighting`` and its parameters."""
        config = dict(config)
        unsupported = [k for k in ("invert_sigmas", "shift_terminal", "stochastic_sampling") if config.get(k)]
        if config.get("time_shift_type", "exponential") != "exponential":
            unsupported.append("time_shift_type")
        if unsupported:
            raise UsageError(f"flow scheduler options {unsupported} are not supported for training")
        keys = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                "base_image_seq_len", "max_image_seq_len")
        values = {k: config[k] for k in keys if config.get(k) is not None}
        return cls(**values, **training)

    def to(self, device) -> FlowSchedule:
        return self  # no tensors: everything is computed on the samples' device

    # -- the grid -------------------------------------------------------------------------------
    def mu(self, like: torch.Tensor) -> float:
        """FLUX's ``mu`` for latents shaped like ``like`` (``(N, C, H, W)``: ``H W / patch^2`` tokens)."""
        h, w = like.shape[-2:]
        return resolution_mu(self, (h // self.patch_size) * (w // self.patch_size))

    def shifted(self, u: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The shifted noise level of the unshifted ``u`` in ``(0, 1]`` (0 stays 0)."""
        if self.use_dynamic_shifting:
            return time_shift(self.mu(like), u)
        return self.shift * u / (1 + (self.shift - 1) * u)

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``sigma(t)`` per sample, shape ``(N, 1, ..., 1)`` like ``like``, float32; ``t = -1`` gives 0."""
        check_timesteps(t, like, self.num_train_timesteps)
        u = (t.to(device=like.device, dtype=torch.float32) + 1) / self.num_train_timesteps
        return self.shifted(u, like).view(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, n: int, *, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` training timesteps: ``u`` from the weighting, grid index ``floor(u T)`` as diffusers' SD3/FLUX
        scripts (``scheduler.sigmas[index]``), returned as ``t = T - 1 - index``; drawn on the generator's device."""
        draw_on = generator.device if generator is not None else device
        if self.weighting == "logit_normal":
            normal = torch.randn((n,), generator=generator, device=draw_on)
            u = torch.sigmoid(normal * self.logit_std + self.logit_mean)
        else:
            u = torch.rand((n,), generator=generator, device=draw_on)
        index = (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)
        return (self.num_train_timesteps - 1 - index).to(device)

    def model_timestep(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """What the transformer is given: ``sigma(t) T`` (diffusers' ``scheduler.timesteps``), shape ``(N,)``."""
        return self.sigma(t, like).flatten() * self.num_train_timesteps

    # -- the Process interface (see ncppo.diffusion.Process) -------------------------------------
    def noise(self, x0, eps, t):
        return add_noise(self, x0, eps, t)

    def target(self, x0, eps):
        return velocity_target(x0, eps)

    def to_target(self, model_output, x_t, t):
        return model_output  # the transformer predicts the velocity itself

    def step_back(self, x_t, prediction, t, k: int, z=None):
        """``x_{t-k}`` by one Euler step from ``sigma(t)`` to ``sigma(t-k)`` (``t - k < 0``: the clean estimate)."""
        return euler_step(self, x_t, prediction, t, (t - k).clamp(min=-1))

    def step_back_gain(self, t, k: int, like):
        return euler_gain(self, t, (t - k).clamp(min=-1), like)

    def renoise(self, x_t, prediction, t, t_new, eps):
        """``x0_hat = x_t - sigma(t) v`` noised again to ``t_new`` with ``eps``."""
        return add_noise(self, predicted_x0(self, x_t, prediction, t).to(x_t.dtype), eps, t_new)

    def renoise_gain(self, t, t_new, like):
        """``c`` of :meth:`renoise`: ``sigma(t) (1 - sigma(t_new))``."""
        return self.sigma(t, like) * (1 - self.sigma(t_new, like))


def resolution_mu(schedule: FlowSchedule, image_seq_len: int) -> float:
    """FLUX's ``mu``: linear in the token count, ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at
    ``max_image_seq_len`` (diffusers' ``calculate_shift``)."""
    slope = (schedule.max_shift - schedule.base_shift) / (schedule.max_image_seq_len - schedule.base_image_seq_len)
    return image_seq_len * slope + schedule.base_shift - slope * schedule.base_image_seq_len


def time_shift(mu: float, u: torch.Tensor) -> torch.Tensor:
    """``e^mu / (e^mu + 1/u - 1)``, the exponential time shift (``u = 0`` maps to 0)."""
    safe = u.clamp(min=1e-12)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / safe - 1))
    return torch.where(u > 0, shifted, torch.zeros_like(shifted))


def add_noise(schedule: FlowSchedule, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_s = (1 - s) x0 + s eps`` with ``s = sigma(t)`` per sample."""
    s = schedule.sigma(t, x0)
    return ((1 - s) * _math(x0) + s * _math(eps)).to(x0.dtype)


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The flow-matching target ``v = eps - x0`` (``d x_s / d s``)."""
    return (_math(eps) - _math(x0)).to(x0.dtype)


def predicted_x0(schedule: FlowSchedule, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x0_hat = x_s - s v``."""
    return _math(x_t) - schedule.sigma(t, x_t) * _math(v)


def euler_step(schedule: FlowSchedule, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, s: torch.Tensor
               ) -> torch.Tensor:
    """``x_{s'} = x_s + (sigma(s) - sigma(t)) v``, each sample from its own ``t`` to its own ``s < t``."""
    if v.shape != x_t.shape:
        raise ValueError(f"x_t {tuple(x_t.shape)} and v {tuple(v.shape)} must have the same shape")
    if bool((s >= t).any()):
        raise ValueError("euler_step steps down: it needs s < t for every sample")
    return euler_update(x_t, v, schedule.sigma(t, x_t), schedule.sigma(s, x_t))


def euler_update(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float
                 ) -> torch.Tensor:
    """``x + (sigma_next - sigma) v`` in float32 (``FlowMatchEulerDiscreteScheduler.step``'s update)."""
    return (_math(x) + (sigma_next - sigma) * _math(v)).to(x.dtype)


def euler_gain(schedule: FlowSchedule, t: torch.Tensor, s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``c = sigma(t) - sigma(s)`` with ``euler_step(v_a) - euler_step(v_b) = -c (v_a - v_b)``."""
    return schedule.sigma(t, like) - schedule.sigma(s, like)


def inference_sigmas(schedule: FlowSchedule, num_inference_steps: int, image_seq_len: int | None = None
                     ) -> torch.Tensor:
    """The ``num_inference_steps + 1`` sigmas ``FlowMatchEulerDiscreteScheduler.set_timesteps`` makes (the last
    is 0): SD3's ``shift(linspace(sigma_max, sigma_min))`` on the already shifted grid ends, as diffusers does,
    or, with dynamic shifting, FLUX's pipeline's ``time_shift(mu, linspace(1, 1/n, n))``."""
    n, big_t = num_inference_steps, schedule.num_train_timesteps
    if schedule.use_dynamic_shifting:
        if image_seq_len is None:
            raise UsageError("a dynamically shifted (FLUX-class) schedule needs the image's token count")
        base = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64).float()  # the pipeline's float32 sigmas
        sigmas = time_shift(resolution_mu(schedule, image_seq_len), base)
    else:  # the grid's float32 ends, then float64 arithmetic, as diffusers' numpy code
        ends = schedule.shifted(torch.tensor([1.0, 1.0 / big_t]), torch.zeros(1))
        base = torch.linspace(float(ends[0]) * big_t, float(ends[1]) * big_t, n, dtype=torch.float64) / big_t
        sigmas = schedule.shifted(base, torch.zeros(1))
    return torch.cat([sigmas.float(), torch.zeros(1)])


FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def process_for(scheduler, **flow_training):
    """The training :class:`~ncppo.diffusion.Process` of a pipeline's scheduler: a :class:`FlowSchedule` for a
    flow-matching scheduler (``flow_training`` sets its timestep weighting), else the DDPM
    :class:`~ncppo.diffusion.NoiseSchedule` its config describes."""
    from ncppo.diffusion import NoiseSchedule

    if type(scheduler).__name__ in FLOW_SCHEDULERS or scheduler.config.get("_class_name") in FLOW_SCHEDULERS:
        return FlowSchedule.from_scheduler_config(scheduler.config, **flow_training)
    if flow_training:
        raise UsageError(f"flow timestep options {sorted(flow_training)} apply to flow-matching models only")
    return NoiseSchedule.from_scheduler_config(scheduler.config)
