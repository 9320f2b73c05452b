"""The training loss: token-level cross-entropy over the real target positions."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of (N, V) ``logits`` against (N,) ``target``, computed in float32,
    with label smoothing (Szegedy et al. 2016) when ``label_smoothing`` > 0."""
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
