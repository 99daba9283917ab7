"""Half precision in one place: the trainer's ``mixed_precision`` names, and the dtypes a module computes in
right now (its weights' and, when autocast is on for its device, autocast's), which the choices that depend on
precision read: the perceptual distance's form and the reference pass."""

from __future__ import annotations

import torch

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def compute_dtypes(weight_dtype: torch.dtype, device: torch.device | str) -> set[torch.dtype]:
    """The dtypes a module with ``weight_dtype`` weights on ``device`` computes in under the current autocast state."""
    device_type = torch.device(device).type
    dtypes = {weight_dtype}
    if torch.is_autocast_enabled(device_type):
        dtypes.add(torch.get_autocast_dtype(device_type))
    return dtypes


def computes_in_half(weight_dtype: torch.dtype, device: torch.device | str) -> bool:
    return bool(compute_dtypes(weight_dtype, device) & set(HALF_DTYPES.values()))
