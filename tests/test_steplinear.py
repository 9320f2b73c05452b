"""SharedWeight: a weight (or several side by side) applied at many steps gets the gradient plain
autograd would give it, in float32 and under bf16 autocast, and search uses it without autograd
(with the weight packed for oneDNN on the CPU: the same products)."""

from __future__ import annotations

import pytest
import torch

from seq2seq.kernels.steplinear import PackedLinear, SharedWeight, StepLinear, can_pack, packs_bf16


def _pieces(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    whole = torch.randn(6, 9, generator=g, requires_grad=True)
    extra = torch.randn(6, 4, generator=g, requires_grad=True)
    return [whole, extra]


def _recurrence(apply, xs: list[torch.Tensor]) -> torch.Tensor:
    """A loss over steps that each feed the previous output back (as real recurrences do)."""
    h = torch.zeros(3, 6)
    total = torch.zeros(())
    for x in xs:
        h = torch.tanh(apply(x + torch.cat([h, h, h[:, :1]], dim=1)))
        total = total + h.square().sum()
    return total


@pytest.mark.parametrize("split", [False, True], ids=["one-weight", "two-pieces"])
def test_gradients_match_plain_autograd_over_many_steps(split):
    pieces = _pieces(0)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 13, generator=g, requires_grad=True) for _ in range(5)]
    weight = torch.cat(pieces, dim=1)
    expected = torch.autograd.grad(_recurrence(lambda x: x @ weight.t(), xs), [*pieces, *xs])
    if split:
        params, shared = pieces, SharedWeight(*pieces)
        expected_params = expected[:2]
    else:
        leaf = weight.detach().requires_grad_()
        params, shared = [leaf], SharedWeight(leaf)
        expected_params = [torch.cat(expected[:2], dim=1)]
    got = torch.autograd.grad(_recurrence(shared, xs), [*params, *xs])
    for a, b in zip(got, [*expected_params, *expected[2:]]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_casts_once_and_keeps_float32_gradients():
    pieces = _pieces(2)
    x = torch.randn(4, 13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shared = SharedWeight(*pieces)
        y = shared(x)
    assert shared.step_weight.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    y.float().sum().backward()
    for p in pieces:
        assert p.grad is not None and p.grad.dtype == torch.float32
    expected = x.sum(0)  # d(sum(x @ W.T)) / dW = column sums of x, for every output row
    torch.testing.assert_close(pieces[0].grad, expected[:9].expand(6, 9), atol=0.1, rtol=0.02)
    torch.testing.assert_close(pieces[1].grad, expected[9:].expand(6, 4), atol=0.1, rtol=0.02)


def test_without_autograd_it_is_a_plain_matmul_of_the_joined_pieces():
    pieces = _pieces(3)
    x = torch.randn(5, 13)
    with torch.no_grad():
        shared = SharedWeight(*pieces)
        assert not shared.tracked
        assert (shared.packed is not None) == torch.backends.mkldnn.is_available()
        torch.testing.assert_close(shared(x), x @ torch.cat(pieces, dim=1).t())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch built without oneDNN packs nothing")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 8, 64, 130])
def test_a_packed_weight_gives_the_plain_product(dtype, rows):
    """Any row count (search compacts its batch; beams multiply it), 2-D and 3-D inputs, and an
    input that is a view into a wider tensor (a slice of a concatenation)."""
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(40, 24, generator=g).to(dtype)
    wide = torch.randn(rows, 30, generator=g).to(dtype)
    x = wide[:, 3:27]
    expected = (x.float() @ weight.float().t())
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}
    if dtype == torch.bfloat16 and not packs_bf16():
        # a CPU whose oneDNN has no bf16 path (no AVX512): such weights are not packed, and the
        # step product is the plain matmul
        assert not can_pack(weight) and StepLinear(weight).packed is None
        torch.testing.assert_close(StepLinear(weight)(x).float(), expected, **tol)
        return
    packed = PackedLinear(weight)
    got = packed(x)
    assert got.dtype == dtype and got.shape == (rows, 40)
    torch.testing.assert_close(got.float(), expected, **tol)
    if rows % 2 == 0:
        got3 = packed(x.reshape(2, rows // 2, 24))
        torch.testing.assert_close(got3.reshape(rows, 40), got, atol=0, rtol=0)


def test_only_fixed_cpu_matrices_of_matmul_dtypes_are_packed():
    assert not can_pack(torch.randn(4, 3, requires_grad=True))  # training: gradients flow through it
    assert not can_pack(torch.randn(2, 4, 3))  # the batched attention memory
    assert not can_pack(torch.randn(4, 3, dtype=torch.float64))
    assert can_pack(torch.randn(4, 3)) == torch.backends.mkldnn.is_available()


def test_a_batched_weight_gets_the_gradient_of_per_step_bmm():
    """The attention memory as a shared weight: (B, out, in) with per-step inputs (B, n, in)."""
    g = torch.Generator().manual_seed(4)
    memory = torch.randn(2, 7, 5, generator=g, requires_grad=True)  # (B, S, D)
    queries = [torch.randn(2, 1, 5, generator=g, requires_grad=True) for _ in range(4)]

    def run(score):
        total = torch.zeros(())
        carry = torch.zeros(2, 1, 5)
        for q in queries:
            s = torch.softmax(score(q + carry), dim=-1)  # (B, 1, S)
            carry = torch.bmm(s, memory.detach())  # feeds the next step, as input feeding does
            total = total + (s * torch.arange(7.0)).sum()
        return total

    expected = torch.autograd.grad(run(lambda q: torch.bmm(q, memory.transpose(1, 2))), [memory, *queries])
    got = torch.autograd.grad(run(SharedWeight(memory)), [memory, *queries])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
