"""Source embedding and a bidirectional, multi-layer LSTM over packed sequences."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class EncoderOutput(NamedTuple):
    outputs: torch.Tensor  # (B, S, 2H) top-layer states, zero at padding
    mask: torch.Tensor  # (B, S) True at real tokens
    # (B, 2H) [forward state at the last real token; backward state at the first]: the
    # fixed-length summary of the whole sentence (Cho et al. 2014).
    summary: torch.Tensor


class Encoder(nn.Module):
    """Embeds the source and runs a bi-LSTM over packed sequences, so padding never enters the
    recurrence and a sentence's states do not depend on what else is in the batch (cuDNN on CUDA)."""

    def __init__(self, vocab_size: int, embedding_size: int, hidden_size: int, num_layers: int,
                 dropout: float, pad_id: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=pad_id)
        self.dropout = nn.Dropout(dropout)
        self.rnn = nn.LSTM(embedding_size, hidden_size, num_layers=num_layers, batch_first=True,
                           bidirectional=True, dropout=dropout if num_layers > 1 else 0.0)
        self.output_size = 2 * hidden_size

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, src_mask: torch.Tensor) -> EncoderOutput:
        emb = self.dropout(self.embedding(src))  # (B, S, E)
        packed = pack_padded_sequence(emb, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h_n, _) = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))  # (B, S, 2H)
        summary = torch.cat([h_n[-2], h_n[-1]], dim=-1)  # (B, 2H): top layer, both directions
        return EncoderOutput(outputs=self.dropout(out), mask=src_mask, summary=summary)
