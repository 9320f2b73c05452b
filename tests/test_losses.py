"""The chunked cross-entropy equals nn.CrossEntropyLoss in value and gradient."""

from __future__ import annotations

import pytest
import torch

from seq2seq import losses
from seq2seq.losses import cross_entropy


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
