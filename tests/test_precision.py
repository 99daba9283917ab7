"""``ncppo.precision``: what a module computes in follows its weights and the autocast state of its device."""

import torch

from ncppo.precision import HALF_DTYPES, compute_dtypes, computes_in_half


def test_weights_alone_decide_outside_autocast():
    assert compute_dtypes(torch.float32, "cpu") == {torch.float32}
    assert not computes_in_half(torch.float32, torch.device("cpu"))
    assert computes_in_half(torch.float16, "cpu") and computes_in_half(torch.bfloat16, "cpu")


def test_autocast_adds_its_dtype_on_its_own_device_only():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtypes(torch.float32, "cpu") == {torch.float32, torch.bfloat16}
        assert computes_in_half(torch.float32, "cpu")
        assert compute_dtypes(torch.float32, "cuda") == {torch.float32}


def test_the_mixed_precision_names():
    assert {"fp16": torch.float16, "bf16": torch.bfloat16} == HALF_DTYPES
