"""The chunked cross-entropy equals nn.CrossEntropyLoss in value and gradient."""

from __future__ import annotations

import pytest
import torch

from seq2seq.kernels import losses
from seq2seq.kernels.losses import cross_entropy
from seq2seq.kernels.shapes import pad_batched, pad_rows


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_cross_entropy(smoothing, dtype, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ROWS", 7)  # several chunks, the last one partial
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(30, 50, generator=g)).to(dtype).requires_grad_()
    target = torch.randint(0, 50, (30,), generator=g)
    ours = cross_entropy(logits, target, smoothing)
    (grad,) = torch.autograd.grad(ours * 2.5, logits)
    reference_logits = logits.detach().float().requires_grad_()
    reference = torch.nn.functional.cross_entropy(reference_logits, target, label_smoothing=smoothing)
    (expected,) = torch.autograd.grad(reference * 2.5, reference_logits)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert grad.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    torch.testing.assert_close(grad.float(), expected.to(dtype).float(), **tol)


def test_gradcheck_in_float64():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.randint(0, 6, (5,), generator=g)
    # the forward computes in float32; compare the analytic gradient with the float64 reference
    (grad,) = torch.autograd.grad(cross_entropy(logits, target, 0.2), logits)
    reference_logits = logits.detach().requires_grad_()
    (expected,) = torch.autograd.grad(
        torch.nn.functional.cross_entropy(reference_logits, target, label_smoothing=0.2), reference_logits)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_a_non_finite_logit_gives_a_non_finite_loss():
    logits = torch.zeros(4, 5)
    logits[2, 1] = float("nan")
    assert not torch.isfinite(cross_entropy(logits, torch.tensor([0, 1, 2, 3])))


@pytest.mark.parametrize("rows", [1, 7, 8, 13])
def test_pad_rows_rounds_up_with_zero_rows(rows):
    x = torch.randn(rows, 3)
    padded = pad_rows(x, 8)
    assert padded.size(0) == -(-rows // 8) * 8
    assert torch.equal(padded[:rows], x) and not padded[rows:].any()


@pytest.mark.parametrize(("rows", "cols"), [(1, 8), (8, 5), (13, 17), (16, 16)])
def test_pad_batched_rounds_both_inner_axes_up_with_zeros(rows, cols):
    x = torch.randn(2, rows, cols)
    padded = pad_batched(x, 8)
    assert padded.shape == (2, -(-rows // 8) * 8, -(-cols // 8) * 8)
    assert torch.equal(padded[:, :rows, :cols], x)
    assert torch.count_nonzero(padded) == torch.count_nonzero(x)  # everything added is zero


def test_padding_rows_are_left_out_of_the_loss_and_get_no_gradient(monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ROWS", 4)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(10, 6, generator=g, requires_grad=True)
    weight = torch.randn(9, 6, generator=g)
    target = torch.randint(0, 9, (10,), generator=g)
    loss = cross_entropy(pad_rows(hidden, 8) @ weight.t(), target)  # 16 rows of logits, 10 real
    (grad,) = torch.autograd.grad(loss, hidden)
    reference_hidden = hidden.detach().requires_grad_()
    reference = torch.nn.functional.cross_entropy(reference_hidden @ weight.t(), target)
    (expected,) = torch.autograd.grad(reference, reference_hidden)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(grad, expected)
    padded_logits = torch.randn(16, 9, requires_grad=True)
    (padded_grad,) = torch.autograd.grad(cross_entropy(padded_logits, target), padded_logits)
    assert not padded_grad[10:].any()


def test_fewer_logit_rows_than_targets_is_refused():
    with pytest.raises(ValueError, match="3 rows of logits for 4 targets"):
        cross_entropy(torch.zeros(3, 5), torch.tensor([0, 1, 2, 3]))


def test_padded_linear_equals_linear_for_any_row_count():
    from seq2seq.kernels import shapes

    g = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(7, 5, generator=g), torch.randn(7, generator=g)
    for lead in [(1,), (3, 4), (2, 70), (129,)]:
        x = torch.randn(*lead, 5, generator=g)
        torch.testing.assert_close(shapes.linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows,real", [(16, 16), (16, 11), (24, 17)])
def test_output_cross_entropy_equals_linear_then_cross_entropy(smoothing, bias, rows, real, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ROWS", 8)  # several chunks; the last one takes the padding rows
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(rows, 5, generator=g, requires_grad=True)
    weight = torch.randn(9, 5, generator=g, requires_grad=True)
    b = torch.randn(9, generator=g, requires_grad=True) if bias else None
    target = torch.randint(0, 9, (real,), generator=g)
    ours = losses.output_cross_entropy(hidden, weight, b, target, smoothing)
    inputs = [hidden, weight] + ([b] if bias else [])
    grads = torch.autograd.grad(ours * 1.5, inputs)
    reference = torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(hidden[:real], weight, b), target, label_smoothing=smoothing)
    expected = torch.autograd.grad(reference * 1.5, inputs)
    torch.testing.assert_close(ours, reference)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not grads[0][real:].any()  # padding rows get no gradient


def test_output_cross_entropy_under_bf16_autocast_is_close_to_float32():
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(40, 16, generator=g, requires_grad=True)
    layer = torch.nn.Linear(16, 30)
    target = torch.randint(0, 30, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = losses.output_cross_entropy(hidden, layer.weight, layer.bias, target)
    half.backward()
    reference = torch.nn.functional.cross_entropy(layer(hidden), target)
    torch.testing.assert_close(half, reference, rtol=0.02, atol=0.02)
    assert layer.weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32


def test_output_cross_entropy_backward_is_single_use():
    """Backward writes the gradient over the saved logits; a second backward must refuse, not
    return a wrong gradient."""
    hidden = torch.randn(8, 5, requires_grad=True)
    weight = torch.randn(9, 5, requires_grad=True)
    loss = losses.output_cross_entropy(hidden, weight, None, torch.randint(0, 9, (8,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single-use"):
        loss.backward()
