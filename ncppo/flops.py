"""FLOP counting of a training step with ``torch.utils.flop_counter.FlopCounterMode``, plus the formulas its
registry lacks: torch's CPU flash attention (forward and backward), which it would otherwise skip without a
word (about a fifth of an SD1.5 step at 512 px); the count is the same as CUDA flash attention's.
Importing this module registers them.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

_aten = torch.ops.aten

__all__ = ["FlopCounterMode"]


@register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
def _cpu_flash_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


@register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
def _cpu_flash_backward_flops(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)
