"""Attention modules: one stateless interface for "no attention", Bahdanau and Luong.

``prepare`` turns the encoder output into an ``AttentionMemory`` once per batch (this is where key
projections are computed); ``forward`` scores any number of queries against it. Nothing is stored
on the module between calls, so the same module serves training, greedy and beam search.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from seq2seq.model.encoder import EncoderOutput


class AttentionMemory(NamedTuple):
    keys: torch.Tensor  # (B, S, K) projected keys, computed once per batch
    values: torch.Tensor  # (B, S, D) encoder states that contexts are averaged from
    mask: torch.Tensor  # (B, S) True at real tokens

    def select(self, index: torch.Tensor) -> AttentionMemory:
        """Rows ``index`` of the batch (search compacts with this)."""
        return AttentionMemory(*(t.index_select(0, index) for t in self))


class AttentionResult(NamedTuple):
    context: torch.Tensor  # (B, T, D)
    weights: torch.Tensor | None  # (B, T, S), rows sum to 1, exactly 0 at padding; None: no attention


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis of (B, T, S) scores with padded positions at exactly zero
    (their score is -inf before the softmax), in float32."""
    return torch.softmax(scores.masked_fill(~mask.unsqueeze(1), float("-inf")), dim=-1, dtype=torch.float32)


def read(weights: torch.Tensor, memory: AttentionMemory) -> torch.Tensor:
    """Contexts (B, T, D): the attention-weighted average of the values."""
    return torch.bmm(weights.to(memory.values.dtype), memory.values)


class Attention(nn.Module):
    """Base class. ``query_free`` attention ignores the query (so the decoder may run in parallel)."""

    query_free = False

    def __init__(self, query_size: int, value_size: int) -> None:
        super().__init__()
        self.query_size = query_size
        self.value_size = value_size

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        raise NotImplementedError

    def forward(self, query: torch.Tensor, memory: AttentionMemory) -> AttentionResult:
        """Attention for (B, T, Q) queries against a memory of B rows."""
        raise NotImplementedError


class NoAttention(Attention):
    """The fixed-vector encoder-decoder (Cho et al. 2014; RNNencdec in Bahdanau et al. 2015):
    every step gets the same context, the encoder's summary, and nothing else of the source."""

    query_free = True

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        summary = enc.summary.unsqueeze(1)  # (B, 1, D)
        mask = torch.ones(summary.shape[:2], dtype=torch.bool, device=summary.device)
        return AttentionMemory(keys=summary, values=summary, mask=mask)

    def forward(self, query: torch.Tensor, memory: AttentionMemory) -> AttentionResult:
        b, t = query.shape[:2]
        return AttentionResult(context=memory.values.expand(b, t, -1), weights=None)


class AdditiveAttention(Attention):
    """score(q, h_j) = v^T tanh(W q + U h_j). Bahdanau et al. 2015, appendix A.1.2 (with the
    previous decoder state as q), and Luong et al. 2015's ``concat`` score (current state).
    U h_j is computed once per batch (``prepare``)."""

    def __init__(self, query_size: int, value_size: int, hidden_size: int) -> None:
        super().__init__(query_size, value_size)
        self.key_proj = nn.Linear(value_size, hidden_size, bias=False)  # U
        self.query_proj = nn.Linear(query_size, hidden_size, bias=True)  # W (+ bias)
        self.energy = nn.Linear(hidden_size, 1, bias=False)  # v

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        return AttentionMemory(keys=self.key_proj(enc.outputs), values=enc.outputs, mask=enc.mask)

    def forward(self, query: torch.Tensor, memory: AttentionMemory) -> AttentionResult:
        # (B, T, 1, A) + (B, 1, S, A): every query against every key
        energies = torch.tanh(self.query_proj(query).unsqueeze(2) + memory.keys.unsqueeze(1))
        scores = self.energy(energies).squeeze(-1)  # (B, T, S)
        weights = masked_softmax(scores, memory.mask)
        return AttentionResult(context=read(weights, memory), weights=weights)


class MultiplicativeAttention(Attention):
    """Luong et al. 2015, section 3.1: ``general`` score(h_t, h_s) = h_t^T W_a h_s, or ``dot``
    score = h_t^T h_s (no parameters; needs equal sizes). W_a h_s is computed once per batch."""

    def __init__(self, query_size: int, value_size: int, general: bool) -> None:
        super().__init__(query_size, value_size)
        if not general and query_size != value_size:
            raise ValueError(f"dot attention needs equal query and value sizes ({query_size} != {value_size})")
        self.general = general
        self.key_proj = nn.Linear(value_size, query_size, bias=False) if general else nn.Identity()

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        return AttentionMemory(keys=self.key_proj(enc.outputs), values=enc.outputs, mask=enc.mask)

    def forward(self, query: torch.Tensor, memory: AttentionMemory) -> AttentionResult:
        scores = torch.bmm(query, memory.keys.transpose(1, 2).to(query.dtype))  # (B, T, S)
        weights = masked_softmax(scores, memory.mask)
        return AttentionResult(context=read(weights, memory), weights=weights)
