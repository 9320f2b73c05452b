"""The training loss: token-level cross-entropy over the real target positions."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of (N, V) ``logits`` against (N,) ``target``, computed in float32,
    with label smoothing (Szegedy et al. 2016) when ``label_smoothing`` > 0."""
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def coverage_penalty(attention: torch.Tensor, tgt_mask: torch.Tensor) -> torch.Tensor:
    """See et al. 2017's coverage loss, sum_j min(a_tj, c_tj) with c_t the attention of the steps
    before t, averaged over the real target positions: it grows when a step attends again to
    what earlier steps already covered. ``attention`` (B, T, S), ``tgt_mask`` (B, T)."""
    a = attention.float()
    coverage = torch.cumsum(a, dim=1) - a
    per_step = torch.minimum(a, coverage).sum(-1)  # (B, T)
    return per_step[tgt_mask].mean()
