"""Measuring a real training step on the CPU, to check the estimate against: its CPU time and the peak of
the memory it allocates (torch's CPU memory profiler: ``torch.profiler`` with ``profile_memory=True``)."""

from __future__ import annotations

import time

import torch


def measured_step(model, objective, batch, *, generator_seed: int = 0) -> dict:
    """``{"cpu_seconds", "peak_bytes", "gradient_bytes", "loss"}`` of one forward and backward of the real step (the trained gradients
    cleared before and after). ``peak_bytes`` is the highest running sum of the profiler's allocation and
    free records during the step: memory the step allocated and still held, as the estimate's activations."""
    from torch.profiler import ProfilerActivity, profile

    from ncppo.step import training_step

    params = model.trainable_parameters()
    for p in params:
        p.grad = None
    generator = torch.Generator().manual_seed(generator_seed)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.process_time()
        out = training_step(model, objective, batch, generator=generator)
        out.loss.backward()
        seconds = time.process_time() - start
        loss = float(out.loss.detach())
        del out
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    for p in params:
        p.grad = None
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, delta in records:
        current += delta
        peak = max(peak, current)
    return {"cpu_seconds": seconds, "peak_bytes": peak, "gradient_bytes": grads, "loss": loss}


def timed_step(model, objective, batch, *, generator_seed: int = 0) -> float:
    """CPU seconds of one forward and backward of the real step (no profiler)."""
    from ncppo.step import training_step

    generator = torch.Generator().manual_seed(generator_seed)
    start = time.process_time()
    out = training_step(model, objective, batch, generator=generator)
    out.loss.backward()
    seconds = time.process_time() - start
    for p in model.trainable_parameters():
        p.grad = None
    return seconds


def hooked_levels(unet, sample, timestep, condition) -> dict:
    """``conv_in``'s, every down block's and the mid block's outputs in one full U-Net forward (forward
    hooks): what the perceptual encoder's levels must equal."""
    found = {}
    modules = {"conv_in": unet.conv_in, "mid": unet.mid_block} | {f"down_{i}": b for i, b in enumerate(unet.down_blocks)}

    def keep(name):
        return lambda _module, _args, out: found.__setitem__(name, out[0] if isinstance(out, tuple) else out)

    hooks = [m.register_forward_hook(keep(name)) for name, m in modules.items()]
    try:
        unet(sample, timestep, **condition.unet_kwargs())
    finally:
        for h in hooks:
            h.remove()
    return found
