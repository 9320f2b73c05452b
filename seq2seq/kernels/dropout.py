"""Dropout with a cheaper random mask on the CPU.

``nn.Dropout`` on the CPU draws its mask with ``bernoulli_``, about 8 ns per element here: some
17 ms of every training update for the four dropout sites of the default model, more than the
recurrent matmuls of the encoder. This draws 64 random bits per four elements from the same
generator (``random_`` on int64) and compares each 16-bit lane with the keep threshold: about a
tenth of the time. The keep probability is rounded to a multiple of 1/65536 (for p = 0.2 it is
exact to 2e-6), the scaling is 1 / (1 - p) as in ``nn.Dropout``, and runs stay reproducible from
the seed (the generator is torch's default one). Elsewhere (CUDA) it is ``nn.functional.dropout``.
"""

from __future__ import annotations

import torch
from torch import nn

_LANES = 4  # int16 lanes per int64 draw


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 0.0 < p < 1.0:
        return nn.functional.dropout(x, p, training)
    n = x.numel()
    bits = torch.empty(-(-n // _LANES), dtype=torch.int64).random_(-(2**63), None)
    lanes = bits.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
    threshold = round((1.0 - p) * 65536) - 32768
    scale = (lanes < threshold).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * scale


class Dropout(nn.Module):
    """``nn.Dropout`` with the mask of ``dropout`` above."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
