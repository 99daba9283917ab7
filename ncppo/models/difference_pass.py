"""The difference pass: a LoRA policy and its reference in one forward, their difference kept exact.

DPO's argument is a difference of the policy's and the reference's losses. Run as two half-precision passes,
their activations differ by the LoRA's small contribution, which bf16 rounds away against the activations
themselves (``benchmarks/precision_floor.py``). This pass runs the model once on activations that are pairs
``(r, d)``, the reference's value and the policy's difference from it (their arithmetic, op by op:
:mod:`ncppo.models.paired_arithmetic`). Here is how a LoRA model runs it: hooks that feed each LoRA branch the
policy's input and make its output a pure difference, gradient checkpointing that recomputes in the pass, and
the split of the output.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
import torch.utils.checkpoint

from ncppo.errors import UsageError
from ncppo.models.paired_arithmetic import Paired, policy_value, reference_value

_ACTIVE = contextvars.ContextVar("ncppo_difference_pass", default=False)


@contextlib.contextmanager
def _active() -> Iterator[None]:
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _to_policy_input(_module, inputs):
    return tuple(policy_value(x) for x in inputs) if _ACTIVE.get() else None


def _to_difference(_module, _inputs, output):
    return Paired(None, policy_value(output)) if _ACTIVE.get() else None


def install_hooks(lora_layers) -> list:
    """Hooks that, while a difference pass runs, give each LoRA branch ``B A x`` the policy's input ``r + d`` and
    make its output difference only; outside one they do nothing. Returns their handles."""
    handles = []
    for layer in lora_layers:
        if any(getattr(layer, "use_dora", {}).values()):
            raise UsageError("the difference pass supports plain LoRA, not DoRA; use reference_pass: separate")
        for name in layer.lora_A:
            handles.append(layer.lora_dropout[name].register_forward_pre_hook(_to_policy_input))
            handles.append(layer.lora_B[name].register_forward_hook(_to_difference))
    return handles


def _recompute_context():
    """Checkpointed blocks recompute during backward, outside the pass: they recompute as they ran."""
    return contextlib.nullcontext(), (_active() if _ACTIVE.get() else contextlib.nullcontext())


def gradient_checkpointing_function(module, *args):
    """diffusers' ``gradient_checkpointing_func`` (non-reentrant, as its default) that recomputes a block of a
    difference pass as a difference pass."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                             context_fn=_recompute_context)


def split(output) -> tuple[torch.Tensor, torch.Tensor]:
    """A pass's output as ``(reference, difference)`` (a difference of zeros when the policy added nothing)."""
    if isinstance(output, Paired):
        return reference_value(output), output.diff if output.diff is not None else torch.zeros_like(reference_value(output))
    return output, torch.zeros_like(output)


def difference_forward(forward: Callable, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reference output, policy output - reference output)`` of ``forward(*args)`` on a LoRA model whose
    adapters are on and carry :func:`install_hooks`, in one pass (the module docstring). The reference carries no
    graph; the difference does."""
    with _active():
        return split(forward(*args, **kwargs))
