"""The two spaces that produce per-sample losses: noise space (3) and NCP space (12)-(17).

A space receives the noised batch (winners and losers stacked, sharing ``t``, ``eps`` and ``z``) and the
policy's (and optionally the reference's) noise predictions, and returns per-sample losses for the
policy and the reference. It never looks at which preference objective consumes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ncppo.batch import Condition
from ncppo.diffusion import add_noise, diffusion_loss, predicted_x0, reverse_step
from ncppo.perception import NoiseConditionedEncoder


@dataclass
class NoisedBatch:
    """``N`` noised images: ``x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps``, plus the reverse-step noise ``z``."""

    x0: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    z: torch.Tensor
    condition: Condition
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class NoiseSpace:
    """(3) ``L = || eps - eps_hat ||^2`` per sample."""

    needs_frozen_unet = False

    def losses(self, model, batch: NoisedBatch, eps_theta, eps_ref=None):
        policy = diffusion_loss(batch.eps, eps_theta)
        reference = diffusion_loss(batch.eps, eps_ref) if eps_ref is not None else None
        return policy, reference


_OFFSET = re.compile(r"^t-(\d+)$")


def parse_encoder_timestep(spec: str) -> int | None:
    """``'t-k'`` -> ``k`` (k >= 1); ``'uniform'`` -> None. Anything else is an error."""
    if spec == "uniform":
        return None
    match = _OFFSET.match(spec)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"unknown encoder timestep {spec!r}; expected 't-1' (default), 't-k' with k >= 1, or 'uniform'")
    return int(match.group(1))


@dataclass(frozen=True)
class PerceptualSpace:
    """(12)-(17): ``PL = || f(x^pred_{t'}, t', c) - f(x^*_{t'}, t', c) ||^2`` with ``f`` the frozen U-Net's down path.

    Encoder timestep ``t' = t-1`` (default): the three ``x_{t-1}`` come from the DDPM reverse step (2)
    with one shared ``z``. ``t-k`` (k >= 2) or ``uniform``: ``x0_hat`` (and ``x0`` for the target) is
    re-noised to ``t'`` with the shared ``eps``. The target embedding is computed once without
    gradient and shared by the policy and reference terms; the policy's gradient flows through ``f``.
    """

    encoder: NoiseConditionedEncoder = field(default_factory=NoiseConditionedEncoder)
    encoder_timestep: str = "t-1"
    needs_frozen_unet = True

    def __post_init__(self):
        parse_encoder_timestep(self.encoder_timestep)

    def _encoder_inputs(self, model, batch: NoisedBatch):
        """The timestep ``t'`` and a map from a noise prediction to the encoder's input at ``t'``."""
        schedule = model.schedule
        offset = parse_encoder_timestep(self.encoder_timestep)
        if offset == 1:
            t_enc = (batch.t - 1).clamp(min=0)
            return t_enc, lambda eps_hat: reverse_step(schedule, batch.x_t, eps_hat, batch.t, batch.z)
        if offset is None:
            t_enc = schedule.sample_timesteps(batch.t.shape[0], device=batch.t.device, generator=batch.generator)
        else:
            t_enc = (batch.t - offset).clamp(min=0)

        def renoise(eps_hat):
            x0_hat = predicted_x0(schedule, batch.x_t, eps_hat, batch.t).to(batch.x_t.dtype)
            return add_noise(schedule, x0_hat, batch.eps, t_enc)

        return t_enc, renoise

    def losses(self, model, batch: NoisedBatch, eps_theta, eps_ref=None):
        t_enc, to_encoder_input = self._encoder_inputs(model, batch)
        n = batch.x_t.shape[0]
        with torch.no_grad():
            frozen_inputs = [to_encoder_input(batch.eps)]  # x^*: the ground truth, from the true noise
            if eps_ref is not None:
                frozen_inputs.append(to_encoder_input(eps_ref))
        x_policy = to_encoder_input(eps_theta)
        k = len(frozen_inputs)
        with model.frozen_unet() as frozen:
            with torch.no_grad():  # target (and reference) embeddings: one batched pass, no graph
                frozen_feats = self.encoder(
                    frozen, torch.cat(frozen_inputs), t_enc.repeat(k), **batch.condition.repeat(k).unet_kwargs()
                )
            policy_feats = self.encoder(frozen, x_policy, t_enc, **batch.condition.unet_kwargs())
        target = [f[:n] for f in frozen_feats]
        policy = self.encoder.distance(policy_feats, target)
        reference = None
        if eps_ref is not None:
            reference = self.encoder.distance([f[n:] for f in frozen_feats], target)
        return policy, reference
