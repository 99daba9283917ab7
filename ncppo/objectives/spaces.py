"""The two spaces that produce per-sample losses: noise space (3) and NCP space (12)-(17).

A space receives the noised batch (winners and losers stacked, sharing ``t``, ``eps`` and ``z``) and the
policy's (and optionally the reference's) predictions, and returns per-sample losses for the policy and
the reference. It never looks at which preference objective consumes them, nor at which process or
backbone the model has: the model's :class:`~ncppo.diffusion.Process` (``model.schedule``) noises, names
the target and takes the reverse step. For a DDPM model the noise space is epsilon space; for a
flow-matching model it is velocity space (``v = eps - x0``: Flow-SFT/DPO/CPO), and NCP's ``t-1`` is the
Euler step to the next lower training sigma ``s'``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ncppo.batch import Condition
from ncppo.diffusion import diffusion_loss
from ncppo.errors import UsageError
from ncppo.perception import NoiseConditionedEncoder
from ncppo.precision import computes_in_half


@dataclass
class NoisedBatch:
    """``N`` noised images ``x_t`` (DDPM: ``sqrt(abar_t) x0 + sqrt(1-abar_t) eps``), the reverse-step noise ``z``
    and the prediction ``target`` (DDPM: ``eps``; flow matching: ``eps - x0``; default ``eps``)."""

    x0: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    z: torch.Tensor
    condition: Condition
    generator: torch.Generator | None = None
    num_pairs: int | None = None  # samples i and i + num_pairs are a pair's winner and loser
    target: torch.Tensor | None = None

    def __post_init__(self):
        if self.num_pairs is None:
            self.num_pairs = self.x_t.shape[0]
        if self.target is None:
            self.target = self.eps


@dataclass(frozen=True)
class NoiseSpace:
    """(3) ``L = || eps - eps_hat ||^2`` per sample; for a flow model ``|| v - v_hat ||^2`` with ``v = eps - x0``."""

    needs_frozen_unet = False

    def losses(self, model, batch: NoisedBatch, eps_theta, eps_ref=None):
        policy = diffusion_loss(batch.target, eps_theta)
        reference = diffusion_loss(batch.target, eps_ref) if eps_ref is not None else None
        return policy, reference

    def diagnostics(self, model, batch: NoisedBatch, eps_theta, policy_losses) -> dict[str, torch.Tensor]:
        return {}


_OFFSET = re.compile(r"^t-(\d+)$")
SCALES = ("paper", "noise")
DISTANCES = ("auto", "exact", "linear")
ENCODER_DTYPES = ("model", "fp32")
TIMESTEP_BINS = 4  # PL / L is reported per quarter of [0, T)


def parse_encoder_timestep(spec: str) -> int | None:
    """``'t-k'`` -> ``k`` (k >= 1); ``'uniform'`` -> None. Anything else is an error."""
    if spec == "uniform":
        return None
    match = _OFFSET.match(spec) if isinstance(spec, str) else None
    if not match or int(match.group(1)) < 1:
        raise UsageError(f"unknown encoder timestep {spec!r}; expected 't-1' (default), 't-k' with k >= 1, or 'uniform'")
    return int(match.group(1))


def _check_choice(option: str, value, choices) -> None:
    if value not in choices:
        raise UsageError(f"unknown {option} {value!r}; expected one of {', '.join(choices)}")


@dataclass(frozen=True)
class PerceptualSpace:
    """(12)-(17): ``PL = || f(x^pred_{t'}, t', c) - f(x^*_{t'}, t', c) ||^2`` with ``f`` the frozen U-Net's down path.

    The three encoder inputs share ``x_t`` and one noise, so ``x^pred - x^* = -c (eps_pred - eps)`` with a
    per-sample gain ``c`` (METHOD.md, "Scale and precision"):

    - ``encoder_timestep``: ``t-1`` (default) the DDPM reverse step (2); ``t-k`` the exact posterior
      ``q(x_{t-k} | x_t, x0_hat)`` (on ``t-1``'s scale); ``uniform`` re-noises ``x0_hat`` and ``x0`` to a
      ``t'`` drawn per pair (shared by its winner and loser) with the shared ``eps``.
    - ``scale``: ``noise`` (default) divides PL by ``c^2``, putting it on the noise MSE's scale up to the
      encoder's gain; ``paper`` keeps PL as the paper writes it (about ``c^2`` = 1e-5 of the noise MSE).
    - ``distance``: ``exact`` subtracts two encoder passes (the paper); ``linear`` uses ``J_f(x*) (x - x*)``
      as a JVP around the target, equal to second order and sound in half precision; ``auto`` is ``exact``
      when the encoder computes in float32 and ``linear`` when it computes in half precision (weights or
      autocast), where the exact difference drowns in rounding (``benchmarks/mixed_precision.py``).
    - ``encoder_dtype``: ``model`` runs ``f`` in the training precision; ``fp32`` in float32, without autocast.

    The target embedding ``f(x*)`` is computed once without gradient and shared by the policy and
    reference terms; policy and reference pass through ``f`` in batches of the same shape, so a policy
    equal to its reference gives bit-identical losses. The policy's gradient flows through ``f``.
    """

    encoder: NoiseConditionedEncoder = field(default_factory=NoiseConditionedEncoder)
    encoder_timestep: str = "t-1"
    scale: str = "noise"
    distance: str = "auto"
    encoder_dtype: str = "model"
    needs_frozen_unet = True

    def __post_init__(self):
        parse_encoder_timestep(self.encoder_timestep)
        _check_choice("perceptual scale", self.scale, SCALES)
        _check_choice("perceptual distance", self.distance, DISTANCES)
        _check_choice("encoder dtype", self.encoder_dtype, ENCODER_DTYPES)

    def _encoder_inputs(self, model, batch: NoisedBatch):
        """The encoder's timestep ``t'``, a map from a prediction to its input, and the gain ``c``."""
        schedule = model.schedule
        offset = parse_encoder_timestep(self.encoder_timestep)
        if offset is not None:
            s = (batch.t - offset).clamp(min=-1)  # the sample's time; s = -1 is x0_hat itself
            gain = schedule.step_back_gain(batch.t, offset, batch.x_t)
            to_input = lambda pred: schedule.step_back(batch.x_t, pred, batch.t, offset, batch.z)  # noqa: E731
            return s.clamp(min=0), to_input, gain
        per_pair = schedule.sample_timesteps(batch.num_pairs, device=batch.t.device, generator=batch.generator)
        t_enc = per_pair.repeat(batch.t.shape[0] // batch.num_pairs)
        to_input = lambda pred: schedule.renoise(batch.x_t, pred, batch.t, t_enc, batch.eps)  # noqa: E731
        return t_enc, to_input, schedule.renoise_gain(batch.t, t_enc, batch.x_t)

    def losses(self, model, batch: NoisedBatch, eps_theta, eps_ref=None):
        t_enc, to_input, gain = self._encoder_inputs(model, batch)
        t_enc = model.schedule.model_timestep(t_enc, batch.x_t)  # DDPM: t' itself; flow: sigma(t') T
        gain = gain.flatten()
        weight = 1.0 / gain.pow(2) if self.scale == "noise" else torch.ones_like(gain)
        cond = batch.condition.unet_kwargs()
        enc = self.encoder
        with torch.no_grad():
            x_star = to_input(batch.target)  # the ground truth, from the true noise (flow: the true velocity)
            x_ref = to_input(eps_ref) if eps_ref is not None else None
        x_policy = to_input(eps_theta)
        with model.perceptual_encoder(self.encoder_dtype) as frozen:
            if self._distance(frozen, x_star) == "exact":
                with torch.no_grad():
                    target = enc(frozen, x_star, t_enc, **cond)
                    reference = enc.distance(enc(frozen, x_ref, t_enc, **cond), target) if x_ref is not None else None
                policy = enc.distance(enc(frozen, x_policy, t_enc, **cond), target)
            else:
                # tangents of size O(1): the gain is applied to the squared distance, in float32
                unit = gain.view(-1, *([1] * (x_star.ndim - 1)))
                if x_ref is None:
                    target, tangent = enc.jvp(frozen, x_star, (x_policy - x_star) / unit, t_enc, **cond)
                    policy = enc.tangent_distance(tangent, [f.detach() for f in target]) * gain.pow(2)
                    reference = None
                else:
                    # PL_theta - PL_ref = <J delta, J delta + 2 J d_ref> with delta = d_theta - d_ref: the small
                    # difference DPO needs comes from its own tangent, not from subtracting two half-precision
                    # distances (which loses it). PL_theta = PL_ref + that difference, in float32.
                    with torch.no_grad():
                        target, t_ref = enc.jvp(frozen, x_star, (x_ref - x_star) / unit, t_enc, **cond)
                        reference = enc.tangent_distance(t_ref, target) * gain.pow(2)
                    _, t_delta = enc.jvp(frozen, x_star, (x_policy - x_ref) / unit, t_enc, **cond)
                    both = [d + 2 * r for d, r in zip(t_delta, t_ref)]
                    policy = reference + enc.tangent_inner(t_delta, both, target) * gain.pow(2)
        return policy * weight, (reference * weight if reference is not None else None)

    def _distance(self, unet, sample: torch.Tensor) -> str:
        if self.distance != "auto":
            return self.distance
        return "linear" if computes_in_half(unet.dtype, sample.device) else "exact"

    def diagnostics(self, model, batch: NoisedBatch, eps_theta, policy_losses) -> dict[str, torch.Tensor]:
        """``pl_over_l_t{q}``: the policy's PL / noise MSE per quarter ``q`` of the timestep range (present bins)."""
        noise = diffusion_loss(batch.target, eps_theta.detach())
        ratio = policy_losses.detach() / noise.clamp(min=1e-30)
        bins = (batch.t * TIMESTEP_BINS) // model.schedule.num_train_timesteps
        return {f"pl_over_l_t{q}": ratio[bins == q].mean() for q in range(TIMESTEP_BINS) if bool((bins == q).any())}
