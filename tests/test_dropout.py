"""The CPU dropout mask (seq2seq/kernels/dropout.py) behaves as nn.Dropout's."""

from __future__ import annotations

import pytest
import torch

from seq2seq.kernels.dropout import Dropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_keeps_a_fraction_one_minus_p_and_scales_the_kept(p):
    torch.manual_seed(0)
    y = dropout(torch.ones(400_000), p, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    assert abs(y.mean().item() - 1.0) < 0.02  # unbiased, as inverted dropout must be


def test_mask_has_no_pattern_across_positions():
    torch.manual_seed(1)
    kept = dropout(torch.ones(4, 100_000), 0.5, training=True) != 0
    # every int16 lane of the random words, and every row, keeps about half
    for lane in range(4):
        assert abs(kept.view(-1)[lane::4].float().mean().item() - 0.5) < 0.01
    assert (kept.float().mean(dim=1) - 0.5).abs().max() < 0.01


def test_identity_in_eval_mode_and_for_p_zero():
    x = torch.randn(3, 5)
    assert dropout(x, 0.3, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    module = Dropout(0.3).eval()
    assert module(x) is x


def test_gradient_is_the_scaled_mask():
    torch.manual_seed(2)
    x = torch.randn(50, 7, requires_grad=True)
    y = dropout(x, 0.25, training=True)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, (y != 0).float() / 0.75)


def test_reproducible_from_the_seed_and_fresh_at_each_call():
    torch.manual_seed(3)
    a, b = dropout(torch.ones(1000), 0.5, True), dropout(torch.ones(1000), 0.5, True)
    torch.manual_seed(3)
    assert torch.equal(dropout(torch.ones(1000), 0.5, True), a)
    assert not torch.equal(a, b)


def test_keeps_dtype_and_shape_of_odd_sizes():
    torch.manual_seed(4)
    for shape in [(1,), (3,), (5, 3, 7)]:
        x = torch.ones(shape, dtype=torch.bfloat16)
        y = dropout(x, 0.5, True)
        assert y.shape == x.shape and y.dtype == torch.bfloat16
