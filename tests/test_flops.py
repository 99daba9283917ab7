"""FLOP counting includes torch's CPU flash attention (FlopCounterMode's own registry skips it)."""

import torch
import torch.nn.functional as F

from ncppo.flops import FlopCounterMode


def test_cpu_attention_is_counted_forward_and_backward():
    q, k, v = (torch.randn(2, 4, 64, 16, requires_grad=True) for _ in range(3))
    counter = FlopCounterMode(display=False)
    with counter:
        out = F.scaled_dot_product_attention(q, k, v)
    forward = counter.get_total_flops()
    assert forward == 2 * (2 * 2 * 4 * 64 * 64 * 16)  # QK^T and AV: 2 FLOPs per multiply-add
    with counter:
        out.sum().backward()
    assert counter.get_total_flops() > forward
