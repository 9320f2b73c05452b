"""Attention-score kernels: the additive score without its (B, T, S, A) activation kept for
backward, and the padding bias the one-node loops add to their scores."""

from __future__ import annotations

import torch


def padding_bias(mask: torch.Tensor) -> torch.Tensor:
    """(B, S) float32, 0 at real tokens and -inf at padding: added to scores, it gives padding
    exactly zero weight in the softmax."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))


class AdditiveScores(torch.autograd.Function):
    """scores = tanh(q + k) . v over (B, T, S, A), without keeping tanh(q + k) for backward.

    Autograd would keep the (B, T, S, A) energies of every decoder step until backward, the
    largest activation of a Bahdanau model (hundreds of MB for a batch of long sentences). Here
    backward recomputes them from q and k, one add and one tanh, and frees them at once.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, keys: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, keys, v)
        return torch.add(keys, q).tanh_() @ v

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, keys, v = ctx.saved_tensors
        energies = torch.add(keys, q).tanh_()  # (B, T, S, A)
        grad_v = torch.einsum("bts,btsa->a", grad, energies)
        # d/d(q + k) = grad * v * (1 - tanh^2), built in place in the energies' buffer
        pre = energies.square_().neg_().add_(1).mul_(grad.unsqueeze(-1)).mul_(v)
        return _sum_to(pre, q), _sum_to(pre, keys), grad_v


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a broadcast gradient back to ``like``'s shape (its size-1 axes)."""
    axes = tuple(i for i in range(grad.dim()) if like.size(i) == 1 and grad.size(i) != 1)
    return grad.sum(dim=axes, keepdim=True) if axes else grad


def additive_scores(q: torch.Tensor, keys: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """v . tanh(q + k) for float32 ``q`` (B, T, 1, A) and ``keys`` (B, 1, S, A): (B, T, S), with
    autocast off (the tanh is the costly part, and on the CPU several times slower in bf16)."""
    with torch.autocast(q.device.type, enabled=False):
        return AdditiveScores.apply(q, keys, v)
