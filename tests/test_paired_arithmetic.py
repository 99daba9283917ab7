"""The difference pass's arithmetic, rule by rule: each op on pairs ``(r, d)`` gives the reference's value and the
policy's difference; what has no sound rule is refused by name."""

import pytest
import torch

from ncppo.errors import UsageError
from ncppo.models.difference_pass import difference_forward
from ncppo.models.paired_arithmetic import Paired


def test_an_op_without_a_rule_is_an_error_naming_it():
    x = Paired(torch.ones(3), torch.full((3,), 1e-3))
    with pytest.raises(UsageError, match="cumsum"):
        torch.cumsum(x, 0)


def test_rules_agree_with_the_ops_on_the_policy_value():
    g = torch.Generator().manual_seed(0)
    r, d = torch.randn(2, 4, 6, generator=g), 1e-3 * torch.randn(2, 4, 6, generator=g)
    r2, d2 = torch.randn(2, 6, 5, generator=g), 1e-3 * torch.randn(2, 6, 5, generator=g)
    x, y = Paired(r, d), Paired(r2, d2)
    cases = {
        "matmul": (lambda a, b: a @ b, (x, y), (r, r2), (r + d, r2 + d2)),
        "mul": (lambda a, b: a * b, (x, x), (r, r), (r + d, r + d)),
        "rsub": (lambda a: 1 - a, (x,), (r,), (r + d,)),
        "div by a pair": (lambda a: 2.0 / (a * a + 1), (x,), (r,), (r + d,)),
        "softmax": (lambda a: torch.softmax(a, -1), (x,), (r,), (r + d,)),
        "einsum": (lambda a, b: torch.einsum("bij,bjk->bik", a, b), (x, y), (r, r2), (r + d, r2 + d2)),
        "cat with a plain tensor": (lambda a: torch.cat([a, torch.ones_like(r)], 1), (x,), (r,), (r + d,)),
    }
    for name, (fn, paired, ref_args, pol_args) in cases.items():
        out = fn(*paired)
        assert torch.allclose(out.ref, fn(*ref_args)), name
        assert torch.allclose(out.diff, fn(*pol_args) - fn(*ref_args), atol=1e-6), name


def test_denoiser_dropout_while_training_is_refused():
    def forward(x):
        return torch.nn.functional.dropout(Paired(x, 1e-3 * x), p=0.1, training=True)

    with pytest.raises(UsageError, match="dropout"):
        difference_forward(forward, torch.randn(1, 4, 4, 4))


def test_attention_in_query_chunks_equals_the_whole_and_the_truth(monkeypatch):
    import ncppo.models.paired_arithmetic as dp

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 8, generator=g) for _ in range(3))
    leaves = [(1e-3 * torch.randn(2, 3, 50, 8, generator=g)).requires_grad_() for _ in range(3)]

    def run():
        for leaf in leaves:
            leaf.grad = None
        dq, dk, dv = leaves
        out = torch.nn.functional.scaled_dot_product_attention(Paired(q, dq), Paired(k, dk), Paired(v, dv))
        (out.diff * torch.linspace(-1, 1, 8)).sum().backward()
        return out.diff.detach(), [leaf.grad.clone() for leaf in leaves]

    whole, grads = run()
    monkeypatch.setattr(dp, "ATTENTION_CHUNK_ELEMENTS", 7 * 50)  # 7 query rows a chunk: 8 chunks, the last short
    chunked, chunked_grads = run()
    with torch.no_grad():
        sdpa = torch.nn.functional.scaled_dot_product_attention
        truth = sdpa(q + leaves[0], k + leaves[1], v + leaves[2]) - sdpa(q, k, v)
    assert (whole - truth).abs().max() < 1e-3 * truth.abs().max()
    assert (chunked - whole).abs().max() < 1e-6
    for a, b in zip(grads, chunked_grads):
        assert a.abs().max() > 0 and (a - b).abs().max() < 1e-5 * a.abs().max()


def test_a_broadcast_sum_and_device_queries_keep_the_pair_whole():
    x = Paired(torch.zeros(1, 2, 1, 1), torch.ones(1, 2, 1, 1))  # e.g. a LoRA'd time embedding
    y = torch.ones(1, 2, 4, 4) + x
    assert y.diff.shape == (1, 2, 4, 4) and float(y.sum().diff) == 32.0  # the difference broadcasts with the value
    assert float((Paired(None, torch.ones(3)) + 1).ref.sum()) == 3.0
    assert x.get_device() == torch.zeros(1).get_device()  # what torch.utils.checkpoint asks of a CUDA argument


def test_what_has_no_sound_rule_is_refused():
    x = Paired(torch.tensor([3.0]), torch.tensor([1.0]))
    with pytest.raises(UsageError, match="rounded division"):
        torch.div(x, 2, rounding_mode="floor")
    with pytest.raises(UsageError, match="second argument"):
        x.type_as(x)
