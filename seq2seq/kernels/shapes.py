"""Matmul row counts rounded up, so that the shapes oneDNN sees repeat from batch to batch.

On the CPU, torch runs bf16 matmuls through oneDNN, which builds a kernel for every new shape
(about 13 ms for the output layer's, on this project's machines) and caches it (growing resident
memory by hundreds of MB over a run). A training batch has its own target length T and source
length S, so every matmul over all steps at once ((B*T, E) word projections, (B*S, D) key
projections, the output layer's N target tokens) met a new shape at almost every update. Padding
the row count with zero rows to a multiple of ``ROW_MULTIPLE`` leaves a handful of shapes, at the
cost of a few percent more arithmetic. Elsewhere (CUDA) nothing is padded.
"""

from __future__ import annotations

import torch

ROW_MULTIPLE = 128
SMALL_MULTIPLE = 8  # for at most ROW_MULTIPLE rows (a decoding step's batch): less waste


def padded_size(n: int, multiple: int = ROW_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def pad_rows(x: torch.Tensor, multiple: int = ROW_MULTIPLE) -> torch.Tensor:
    """``x`` (N, ...) with zero rows appended up to a multiple of ``multiple`` rows (CPU only)."""
    extra = padded_size(x.size(0), multiple) - x.size(0)
    if not extra or x.device.type != "cpu":
        return x
    return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))])


def pad_batched(x: torch.Tensor, multiple: int = SMALL_MULTIPLE) -> torch.Tensor:
    """``x`` (B, N, M) with N and M zero-padded up to multiples of ``multiple`` (CPU only): a
    batched matmul over a training batch's target length T and source length S would otherwise
    meet a new (T, S) pair, and build a new kernel, at most updates."""
    rows, cols = (padded_size(n, multiple) - n for n in x.shape[1:])
    if not (rows or cols) or x.device.type != "cpu":
        return x
    return torch.nn.functional.pad(x, (0, cols, 0, rows))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           multiple: int | None = None) -> torch.Tensor:
    """``nn.functional.linear`` over (..., in) with the flattened rows padded (see above) to a
    multiple of ``multiple`` (default: ROW_MULTIPLE, or SMALL_MULTIPLE for a small batch)."""
    rows = x.reshape(-1, x.size(-1))
    if multiple is None:
        multiple = ROW_MULTIPLE if rows.size(0) > ROW_MULTIPLE else SMALL_MULTIPLE
    out = torch.nn.functional.linear(pad_rows(rows, multiple), weight, bias)
    return out[: rows.size(0)].view(*x.shape[:-1], out.size(-1))
