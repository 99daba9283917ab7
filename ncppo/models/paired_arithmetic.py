"""The arithmetic of the difference pass: activations carried as pairs ``(reference, policy - reference)``.

DPO's argument is a difference of the policy's and the reference's losses. Run as two half-precision passes,
their activations differ by the LoRA's small contribution, which bf16 (8 significant bits) rounds away against
the activations themselves (``benchmarks/precision_floor.py``: gradient cosines of 0.76-0.96 with float32).
This pass carries each activation as a pair ``(r, d)``: ``r`` the reference's value, computed by exactly the
ops of a reference pass, and ``d = policy - reference`` with its own exponent, so ``d`` has half precision's
*relative* accuracy instead of an absolute error at the scale of ``r``:

- ops linear in the activation (linear layers, convolutions, reshapes, sums, products with a constant) act on
  ``r`` and ``d`` separately, in the model's precision (a bias belongs to ``r``);
- products of two pairs (attention, GEGLU) expand ``(r1 + d1)(r2 + d2) - r1 r2 = r1 d2 + d1 (r2 + d2)``;
- nonlinear ops (SiLU, GELU, group and layer norm, softmax) compute ``d = g(r + d) - g(r)`` in float32,
  where the subtraction is exact enough: elementwise work, not matrix products;
- a LoRA layer's branch ``B A x`` takes the policy's input ``r + d`` and adds to ``d`` only.

So the policy's matrix products run in half precision as in a separate pass, while the reference comes for the
price of the ``r`` stream (about the separate reference pass's cost). A torch function without a rule is an
error naming it, never a silent fallback. Written here because no library carries a value and its difference
through a network (forward-mode AD linearises; this is exact).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ncppo.errors import UsageError


class Paired(torch.Tensor):
    """An activation of the difference pass: ``ref`` (the reference's value; None means zero, the output of a
    LoRA branch) and ``diff`` (the policy's value minus the reference's; None means zero)."""

    ref: torch.Tensor | None
    diff: torch.Tensor | None

    @staticmethod
    def __new__(cls, ref: torch.Tensor | None, diff: torch.Tensor | None):
        like = ref if ref is not None else diff
        out = torch.Tensor._make_wrapper_subclass(cls, like.shape, strides=like.stride(), dtype=like.dtype,
                                                  device=like.device, requires_grad=False)
        out.ref, out.diff = ref, diff
        return out

    def __repr__(self) -> str:
        return f"Paired(shape={tuple(self.shape)}, dtype={self.dtype})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) == "__get__":  # an attribute (shape, dtype, device, ndim...)
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        rule = _RULES.get(func)
        if rule is None:
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            raise UsageError(f"the difference pass has no rule for torch function {name!r}; train with "
                             "reference_pass: separate, or add the rule to ncppo.models.paired_arithmetic")
        return rule(func, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # the wrapper has no storage: every op must be taken by a rule above
        raise UsageError(f"the difference pass reached the operator {func} without a rule; train with "
                         "reference_pass: separate")


def reference_value(x):
    """The reference's value of an argument (a plain tensor or a number is shared by both)."""
    if isinstance(x, Paired):
        return x.ref if x.ref is not None else torch.zeros_like(x.diff)
    return x


def _diff(x):
    return x.diff if isinstance(x, Paired) else None


def policy_value(x):
    """The policy's value ``r + d`` of an argument, in the activation's dtype."""
    if not isinstance(x, Paired):
        return x
    if x.diff is None:
        return x.ref
    return x.diff if x.ref is None else x.ref + x.diff.to(x.ref.dtype)


def _pair(ref, diff):
    """A result: plain when no difference remains."""
    return ref if diff is None else Paired(ref, diff)


def _each(fn, x):
    """``fn`` linear, applied to the value and to the difference alike (a plain ``x``: to it)."""
    if not isinstance(x, Paired):
        return fn(x)
    return _pair(fn(x.ref) if x.ref is not None else None, fn(x.diff) if x.diff is not None else None)


def _map(fn, x):
    if isinstance(x, (list, tuple)):
        return type(x)(_map(fn, v) for v in x)
    return fn(x)


# -- rules -----------------------------------------------------------------------------------------
def _structural(func, args, kwargs):
    """Ops that act on a value and its difference alike (views, casts, indexing, concatenation)."""
    first, rest = args[0], args[1:]
    if any(isinstance(a, Paired) for a in _flat(rest)) or any(isinstance(v, Paired) for v in kwargs.values()):
        raise UsageError(f"the difference pass has no rule for {getattr(func, '__name__', func)} with an activation "
                         "as a second argument")
    if isinstance(first, (list, tuple)):  # cat / stack: a plain member has no difference
        refs = [reference_value(m) for m in first]
        if all(_diff(m) is None for m in first):
            return func(refs, *rest, **kwargs)
        diffs = [_diff(m) if _diff(m) is not None else torch.zeros_like(reference_value(m)) for m in first]
        return Paired(func(refs, *rest, **kwargs), func(diffs, *rest, **kwargs))
    out_ref = func(reference_value(first), *rest, **kwargs) if first.ref is not None else None
    out_diff = func(first.diff, *rest, **kwargs) if first.diff is not None else None
    some = out_ref if out_ref is not None else out_diff
    if isinstance(some, (list, tuple)):  # chunk, split, unbind
        refs = out_ref if out_ref is not None else [None] * len(some)
        diffs = out_diff if out_diff is not None else [None] * len(some)
        return type(some)(_pair(r, d) for r, d in zip(refs, diffs))
    if not isinstance(some, torch.Tensor):  # numel, dim, size...
        return some
    return _pair(out_ref, out_diff)


def _affine(func, args, kwargs):
    """``f(x, W, b)`` linear in ``x`` (linear, conv): the bias belongs to the reference's value."""
    x, rest = args[0], list(args[1:])
    if any(isinstance(a, Paired) for a in rest) or any(isinstance(v, Paired) for v in kwargs.values()):
        raise UsageError(f"the difference pass needs {func.__name__}'s weights plain (frozen or LoRA-wrapped)")
    out_ref = func(reference_value(x), *rest, **kwargs)
    if x.diff is None:
        return out_ref
    if len(rest) >= 2:
        rest[1] = None
    kwargs = {**kwargs, "bias": None} if "bias" in kwargs else kwargs
    return Paired(out_ref, func(x.diff, *rest, **kwargs))


def _linear_map(func, args, kwargs):
    """Ops linear in their one activation argument (interpolation, pooling, sums, means)."""
    return _each(lambda t: func(t, *args[1:], **kwargs), args[0])


def _add(func, args, kwargs, sign: float = 1.0):
    """``a + alpha b`` (``sign`` -1: subtraction); a plain operand (a bias, a time embedding) has no difference."""
    a, b = args[0], args[1]
    alpha = kwargs.get("alpha", 1) * sign

    def combine(x, y):
        if y is None:
            return x
        y = y if alpha == 1 else alpha * y
        return y if x is None else x + y

    ref = combine(a.ref if isinstance(a, Paired) else a, b.ref if isinstance(b, Paired) else b)
    diff = combine(_diff(a), _diff(b))
    if diff is None:
        return ref
    if ref is not None and not isinstance(ref, torch.Tensor):  # a difference-only value plus a number
        ref = torch.full_like(diff, ref)
    if ref is not None and ref.shape != diff.shape:  # a plain operand broadcast the value, not the difference
        shape = torch.broadcast_shapes(ref.shape, diff.shape)
        ref, diff = ref.expand(shape), diff.expand(shape)
    return Paired(ref, diff)


def _sub(func, args, kwargs):
    if func.__name__ == "__rsub__":  # number - self
        return _add(func, (args[1], _neg(func, args[:1], {})), {})
    return _add(func, args, kwargs, -1.0)


def _neg(func, args, kwargs):
    return _each(torch.neg, args[0])


def _bilinear(op: Callable, a, b):
    """``op`` bilinear (product, matrix product): ``op(r1 + d1, r2 + d2) - op(r1, r2) = op(r1, d2) + op(d1, r2 + d2)``."""
    if not isinstance(b, Paired):
        return _each(lambda t: op(t, b), a)
    if not isinstance(a, Paired):
        return _each(lambda t: op(a, t), b)
    ra, rb = reference_value(a), reference_value(b)
    ref = op(ra, rb) if a.ref is not None and b.ref is not None else None
    terms = []
    if b.diff is not None:
        terms.append(op(ra, b.diff.to(ra.dtype)))
    if a.diff is not None:
        terms.append(op(a.diff.to(rb.dtype), policy_value(b)))
    diff = terms[0] if len(terms) == 1 else (terms[0] + terms[1] if terms else None)
    return _pair(ref, diff)


def _product(func, args, kwargs):
    """Elementwise and matrix products."""
    return _bilinear(lambda x, y: func(x, y), args[0], args[1])


def _einsum(func, args, kwargs):
    """``einsum(equation, *operands)``: linear in each operand (a permutation or contraction with constants),
    bilinear in two activations."""
    equation, operands = args[0], list(args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    paired = [i for i, x in enumerate(operands) if isinstance(x, Paired)]
    if len(paired) > 2:
        raise UsageError("the difference pass supports einsum with at most two activations")
    if len(paired) == 2:
        i, j = paired

        def op(a, b):
            ops = list(operands)
            ops[i], ops[j] = a, b
            return func(equation, *ops)
        return _bilinear(op, operands[i], operands[j])
    (i,) = paired

    def one(x):
        ops = list(operands)
        ops[i] = x
        return func(equation, *ops)
    return _each(one, operands[i])


def _div(func, args, kwargs):
    a, b = args[0], args[1]
    if func.__name__ in ("__rtruediv__", "__rdiv__"):  # number / self
        a, b = b, a
    if kwargs.get("rounding_mode") is not None:
        raise UsageError("the difference pass has no rule for a rounded division of an activation")
    if not isinstance(b, Paired):  # linear in a
        return _each(lambda t: t / b, a)
    return _nonlinear(lambda x, y: torch.div(x, y), (a, b), {})


def _float32(x):
    if isinstance(x, Paired):
        return x
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.float()
    return x


def _nonlinear(func, args, kwargs):
    """``d = g(r + d) - g(r)`` in float32 (autocast off); ``r`` as the reference pass computes it."""
    out_ref = func(*_map(reference_value, args), **kwargs)
    if all(_diff(a) is None for a in _flat(args)):
        return out_ref
    device = out_ref.device.type

    # both evaluations get fresh contiguous float32 inputs: one kernel path, so d = 0 gives exactly 0
    def ref32(x):
        return reference_value(x).float().clone(memory_format=torch.contiguous_format) if isinstance(x, Paired) else _float32(x)

    def pol32(x):
        if isinstance(x, Paired) and x.diff is not None:
            return ref32(x) + x.diff.float()
        return ref32(x)

    with torch.autocast(device, enabled=False):
        kw32 = {k: _float32(v) for k, v in kwargs.items()}
        diff = func(*_map(pol32, args), **kw32) - func(*_map(ref32, args), **kw32)
    return Paired(out_ref, diff.to(out_ref.dtype))


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


def _dropout(func, args, kwargs):
    x = args[0]
    p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    training = kwargs.get("training", args[2] if len(args) > 2 else True)
    if p == 0 or not training:
        return x
    raise UsageError("the difference pass needs the denoiser's dropout at 0 while training (the policy and the "
                     "reference would draw different masks); LoRA dropout is fine")


ATTENTION_CHUNK_ELEMENTS = 2**26  # score entries per query chunk (256 MiB in float32): the N^2 matrices never whole


def _attention(func, args, kwargs):
    """Scaled dot-product attention: ``r`` by the kernel itself (as the reference pass), the difference from
    ``dS = (q_r dk^T + dq k^T) s``, ``dP = softmax(S + dS) - softmax(S)`` in float32 and ``dO = dP v + P_r dv``,
    the products in the activations' precision. The scores are formed a chunk of queries at a time and each
    chunk is recomputed in backward (as a fused kernel does), so memory stays linear in the sequence."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args)) | kwargs
    q, k, v = bound["query"], bound["key"], bound["value"]
    if bound.get("dropout_p", 0.0) or bound.get("is_causal", False) or bound.get("enable_gqa", False):
        raise UsageError("the difference pass supports attention without dropout, causal masks or GQA")
    mask, scale = bound.get("attn_mask"), bound.get("scale")
    out_ref = func(reference_value(q), reference_value(k), reference_value(v), attn_mask=mask, scale=scale)
    if all(_diff(x) is None for x in (q, k, v)):
        return out_ref
    dtype = out_ref.dtype
    q_r, k_r = reference_value(q).to(dtype), reference_value(k).to(dtype)
    zeros = lambda x: torch.zeros_like(x)  # noqa: E731
    q_d = _diff(q).to(dtype) if _diff(q) is not None else zeros(q_r)
    k_d = _diff(k).to(dtype) if _diff(k) is not None else zeros(k_r)
    v_p = policy_value(v).to(dtype)
    v_d = _diff(v).to(dtype) if _diff(v) is not None else zeros(v_p)
    k_p = policy_value(k).to(dtype)
    bias = None
    if mask is not None:
        bias = mask.float() if mask.dtype != torch.bool else torch.zeros(mask.shape, device=mask.device).masked_fill(
            ~mask, float("-inf"))
    scale = scale if scale is not None else q_r.shape[-1] ** -0.5
    rows_total, keys = q_r.shape[-2], k_r.shape[-2]
    rows = max(1, ATTENTION_CHUNK_ELEMENTS // max(1, q_r[..., :1, :1].numel() * keys))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_d, k_d, v_p, v_d, k_p))
    chunks = []
    for start in range(0, rows_total, rows):
        part = slice(start, min(start + rows, rows_total))
        chunk_bias = bias[..., part, :] if bias is not None and bias.dim() >= 2 and bias.shape[-2] > 1 else bias
        inputs = (q_r[..., part, :], q_d[..., part, :], k_r, k_d, k_p, v_p, v_d)
        if grad:
            chunks.append(torch.utils.checkpoint.checkpoint(_attention_difference, *inputs, chunk_bias, scale,
                                                            use_reentrant=False))
        else:
            chunks.append(_attention_difference(*inputs, chunk_bias, scale))
    return Paired(out_ref, chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=-2))


def _attention_difference(q_r, q_d, k_r, k_d, k_p, v_p, v_d, bias, scale):
    """One chunk of queries: ``dO = (softmax(S + dS) - softmax(S)) v_p + softmax(S) dv``."""
    # S itself comes in the activations' precision (a float32 product would cost the score's FLOPs at FP32 rates):
    # dP is then taken at a point about |S| 2^-8 off in bf16, a relative error of that order in dP, not in r
    s_ref = torch.matmul(q_r, k_r.transpose(-2, -1)).float() * scale
    s_diff = (torch.matmul(q_r, k_d.transpose(-2, -1)) + torch.matmul(q_d, k_p.transpose(-2, -1))).float() * scale
    if bias is not None:
        s_ref = s_ref + bias
    with torch.autocast(s_ref.device.type, enabled=False):
        p_ref = torch.softmax(s_ref, dim=-1)
        p_diff = torch.softmax(s_ref + s_diff, dim=-1) - p_ref
    return torch.matmul(p_diff.to(v_p.dtype), v_p) + torch.matmul(p_ref.to(v_d.dtype), v_d)


_RULES: dict = {}


def _register(rule, *names: str, owners=(torch, torch.Tensor, F)) -> None:
    for name in names:
        for owner in owners:
            fn = getattr(owner, name, None)
            if fn is not None:
                _RULES[fn] = rule


_register(_structural, "__getitem__", "chunk", "split", "unbind", "contiguous", "expand", "flatten", "unflatten",
          "permute", "reshape", "transpose", "view", "to", "float", "half", "bfloat16", "type_as", "squeeze",
          "unsqueeze", "repeat", "repeat_interleave", "narrow", "movedim", "cat", "concat", "concatenate", "stack",
          "clone", "detach", "split_with_sizes", "get_device", "numel", "dim", "size", "is_floating_point", "is_contiguous", "stride",
          "element_size", "__len__")
_register(_affine, "linear", "conv1d", "conv2d", "conv3d")
_register(_linear_map, "interpolate", "avg_pool2d", "sum", "mean")
_register(_add, "add", "__add__", "__radd__")
_register(_sub, "sub", "__sub__", "__rsub__")
_register(_neg, "neg", "__neg__")
_register(_product, "mul", "__mul__", "__rmul__", "matmul", "bmm", "__matmul__")
_register(_einsum, "einsum")
_register(_div, "div", "__truediv__", "__rtruediv__", "__rdiv__")
_register(_nonlinear, "silu", "gelu", "relu", "sigmoid", "tanh", "softmax", "group_norm", "layer_norm",
          "rms_norm", "exp", "sqrt", "rsqrt", "pow", "__pow__", "square", "erf")
_register(_dropout, "dropout")
_register(_attention, "scaled_dot_product_attention")
