"""One training step for any objective: noise the pairs, run policy (and reference), score, combine.

Winners and losers of a pair share ``t``, ``eps`` and the reverse-step noise ``z`` (METHOD.md: lower
variance). The policy runs once on ``[winners; losers]``; the reference (only when the objective needs
``eps_ref``) comes with it from ``model.predict_with_reference`` (a separate pass under ``no_grad`` on the frozen
U-Net, or the difference pass that keeps ``eps_theta - eps_ref`` exact in half precision). The step reads only the objective's declared
needs; the loss space and the preference loss do the rest. The caller calls ``backward``. The model's
process (``model.schedule``: DDPM or flow matching) noises and names the target; "``eps_theta``" is the
model's prediction in that target space (epsilon, or the velocity of a flow model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ncppo.batch import Condition, EncodedPairs, PreferenceBatch
from ncppo.objectives.preference import PairLosses
from ncppo.objectives.registry import Objective
from ncppo.objectives.spaces import NoisedBatch


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, with graph
    metrics: dict[str, torch.Tensor]  # detached scalars


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device, like.dtype)


def noise_pairs(model, pairs: EncodedPairs, uses_loser: bool, generator=None) -> NoisedBatch:
    """Stack winners (and losers) and noise them with a ``t``, ``eps`` and ``z`` shared within each pair."""
    sides = [pairs.latents_w] + ([pairs.latents_l] if uses_loser else [])
    conditions = [pairs.condition_w] + ([pairs.condition_l] if uses_loser else [])
    k, b = len(sides), pairs.batch_size
    x0 = torch.cat(sides)
    t = model.schedule.sample_timesteps(b, device=x0.device, generator=generator).repeat(k)
    eps = _randn(pairs.latents_w.shape, x0, generator).repeat(k, *([1] * (x0.ndim - 1)))
    z = _randn(pairs.latents_w.shape, x0, generator).repeat(k, *([1] * (x0.ndim - 1)))
    x_t = model.schedule.noise(x0, eps, t)
    return NoisedBatch(x0, x_t, t, eps, z, Condition.cat(conditions), generator, num_pairs=b,
                       target=model.schedule.target(x0, eps))


def encode_pairs(model, batch: PreferenceBatch | EncodedPairs, generator=None) -> EncodedPairs:
    """The batch as the step consumes it: encoded batches pass through, raw ones are encoded by the model."""
    return batch if isinstance(batch, EncodedPairs) else model.encode_batch(batch, generator)


def training_step(
    model,
    objective: Objective,
    batch: PreferenceBatch | EncodedPairs,
    *,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Loss and metrics of ``objective`` on a batch of pairs (raw or encoded)."""
    pairs = encode_pairs(model, batch, generator)
    noised = noise_pairs(model, pairs, objective.uses_loser, generator)
    if objective.needs_reference_prediction:
        eps_theta, eps_ref = model.predict_with_reference(noised.x_t, noised.t, noised.condition)
    else:
        eps_theta, eps_ref = model.predict_epsilon(model.policy, noised.x_t, noised.t, noised.condition), None
    policy, reference_losses = objective.space.losses(model, noised, eps_theta, eps_ref)
    losses = PairLosses.from_stacked(policy, reference_losses, pairs.batch_size, pairs.is_tie)
    loss, metrics = objective.preference(losses)
    metrics.update(objective.space.diagnostics(model, noised, eps_theta, policy))
    return StepOutput(loss, metrics)
