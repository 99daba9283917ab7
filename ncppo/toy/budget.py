"""Equal compute for the toy world's runs, counted in FLOPs rather than seconds.

The paper compares methods at equal training compute. A wall-clock budget moves with the machine and its
load (the same ``make demo`` gave DPO 34 steps on one machine and 84 on another); a FLOP count does not.
Each method's step is counted once, on the run's first batch, by ``torch.utils.flop_counter`` (forward and
backward of the real ``training_step``); a run then gets as many steps as fit in the budget, expressed in
noise-space DPO steps.
"""

from __future__ import annotations

import torch

REFERENCE_METHOD = "dpo"


def training_step_flops(model, objective, batch, seed: int = 0) -> int:
    """FLOPs of one training step of ``objective`` on ``batch`` (forward and backward), as torch counts them."""
    from ncppo.flops import FlopCounterMode  # with CPU flash attention counted
    from ncppo.step import training_step

    counter = FlopCounterMode(display=False)
    with counter:
        out = training_step(model, objective, batch, generator=torch.Generator().manual_seed(seed))
        out.loss.backward()
    for p in model.unet.parameters():
        p.grad = None
    return int(counter.get_total_flops())


def equal_compute_steps(budget_dpo_steps: int, flops: dict[str, int], reference: str = REFERENCE_METHOD) -> dict[str, int]:
    """Steps per method: ``round(budget * FLOPs(reference step) / FLOPs(its step))``, at least 1."""
    return {name: max(1, round(budget_dpo_steps * flops[reference] / f)) for name, f in flops.items()}


def first_batch(base_model, dataset, batch_size: int, resolution: int, lora_rank: int):
    """The model a run trains (the base model with fresh LoRA) and its dataset's first batch: what a step's
    FLOPs are counted on."""
    from ncppo.data.pairs import PreferencePairs
    from ncppo.models.preference_model import LoraSettings, PreferenceModel

    pairs = PreferencePairs(dataset)
    batch = pairs.collate(pairs.plan(batch_size, shuffle=False)[0], resolution)
    return PreferenceModel.from_pretrained(base_model, lora=LoraSettings(lora_rank)), batch


def method_flops(methods, objective_options, base_model, dataset, batch_size: int, resolution: int,
                 lora_rank: int) -> dict[str, int]:
    """FLOPs per step of each method (and of the reference method, always) on ``dataset``'s first batch;
    ``objective_options(method)`` gives the options the trainer builds the objective from."""
    from ncppo.objectives import make_objective

    model, batch = first_batch(base_model, dataset, batch_size, resolution, lora_rank)
    out = {}
    for method in dict.fromkeys([REFERENCE_METHOD, *methods]):
        options = {k: v for k, v in objective_options(method).items() if k != "beta"}  # beta does not change FLOPs
        out[method] = training_step_flops(model, make_objective(**options), batch)
    return out
