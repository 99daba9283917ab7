"""``beta: auto``: the DPO/CPO temperature of a perceptual objective, measured before training.

At the paper's ``beta`` the perceptual argument is about 1e-5 (METHOD.md, "Scale and precision"): the
loss never leaves log 2. Calibration puts it where noise-space DPO's sits at ``target_beta``:

    beta = target_beta * mean(L_ref) / mean(PL_ref)

over the first batches, with ``L_ref`` the reference's noise MSE (3) and ``PL_ref`` its loss in the
objective's space (both from the frozen model, so the value does not depend on the policy). For a
noise-space objective the ratio is exactly 1. The measurement is deterministic given the batches and
generators, so a resumed run recomputes the same value (the trainer also records it).
"""

from __future__ import annotations

import math

import torch

from ncppo.diffusion import diffusion_loss
from ncppo.errors import StateError
from ncppo.objectives.preference import DEFAULT_BETA
from ncppo.objectives.registry import Objective
from ncppo.step import encode_pairs, noise_pairs


@torch.no_grad()
def calibrate_beta(model, objective: Objective, batches, generators, target_beta: float = DEFAULT_BETA,
                   average=None) -> tuple[Objective, dict]:
    """The objective with its calibrated ``beta``, and a record of the measurement (for the run's files).
    ``average`` maps this process's ratio to the ratio over all processes (the trainer's all-reduce)."""
    noise_sum = space_sum = 0.0
    count = 0
    for i, (batch, generator) in enumerate(zip(batches, generators, strict=True)):
        pairs = encode_pairs(model, batch, generator)
        noised = noise_pairs(model, pairs, objective.uses_loser, generator)
        with model.frozen_unet() as reference:
            eps_ref = model.predict_epsilon(reference, noised.x_t, noised.t, noised.condition)
        noise = diffusion_loss(noised.target, eps_ref)  # the noise (flow: velocity) MSE
        space, _ = objective.space.losses(model, noised, eps_ref)
        n, s = float(noise.double().sum()), float(space.double().sum())
        if not (math.isfinite(n) and math.isfinite(s)) or s <= 0:
            raise StateError(f"beta calibration: calibration batch {i} (pair ids {list(pairs.ids)[:8]}) gives a "
                             f"{'non-finite' if not math.isfinite(s) else 'zero'} {objective.name} loss ({s!r}); "
                             "check the data and the model, or give objective.beta a number")
        noise_sum, space_sum, count = noise_sum + n, space_sum + s, count + noise.numel()
    if count == 0:
        raise StateError("beta calibration: no calibration batch had a valid pair")
    ratio = noise_sum / space_sum if average is None else float(average(noise_sum / space_sum))
    beta = target_beta * ratio
    record = {"beta": beta, "target_beta": target_beta, "noise_over_space": ratio, "samples": count,
              "mean_noise_loss": noise_sum / count, "mean_space_loss": space_sum / count}
    return objective.with_beta(beta), record
