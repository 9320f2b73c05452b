"""Source embedding and a bidirectional, multi-layer LSTM: cuDNN over packed sequences on CUDA,
seq2seq.lstm on the CPU."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seq2seq.dropout import Dropout, dropout
from seq2seq.lstm import bidirectional_layer


class EncoderOutput(NamedTuple):
    outputs: torch.Tensor  # (B, S, 2H) top-layer states, zero at padding
    mask: torch.Tensor  # (B, S) True at real tokens
    # (B, 2H) [forward state at the last real token; backward state at the first]: the
    # fixed-length summary of the whole sentence (Cho et al. 2014).
    summary: torch.Tensor


class Encoder(nn.Module):
    """Embeds the source and runs a bi-LSTM in which padding never enters the recurrence, so a
    sentence's states do not depend on what else is in the batch: on CUDA cuDNN over packed
    sequences, on the CPU ``seq2seq.lstm`` (same parameters, same numbers, no per-shape kernels)."""

    def __init__(self, vocab_size: int, embedding_size: int, hidden_size: int, num_layers: int,
                 dropout: float, pad_id: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=pad_id)
        self.dropout = Dropout(dropout)
        self.rnn = nn.LSTM(embedding_size, hidden_size, num_layers=num_layers, batch_first=True,
                           bidirectional=True, dropout=dropout if num_layers > 1 else 0.0)
        self.output_size = 2 * hidden_size

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, src_mask: torch.Tensor) -> EncoderOutput:
        emb = self.dropout(self.embedding(src))  # (B, S, E)
        if emb.device.type == "cpu":
            out, summary = self._cpu_layers(emb, src_mask)
            return EncoderOutput(outputs=self.dropout(out), mask=src_mask, summary=summary)
        packed = pack_padded_sequence(emb, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h_n, _) = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))  # (B, S, 2H)
        summary = torch.cat([h_n[-2], h_n[-1]], dim=-1)  # (B, 2H): top layer, both directions
        return EncoderOutput(outputs=self.dropout(out), mask=src_mask, summary=summary)

    def _cpu_layers(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rnn = self.rnn
        for k in range(rnn.num_layers):
            if k > 0:
                x = dropout(x, rnn.dropout, self.training)  # as nn.LSTM, between layers
            fwd, bwd = f"_l{k}", f"_l{k}_reverse"
            w_ih = torch.cat([getattr(rnn, "weight_ih" + fwd), getattr(rnn, "weight_ih" + bwd)])
            bias = torch.cat([getattr(rnn, "bias_ih" + fwd) + getattr(rnn, "bias_hh" + fwd),
                              getattr(rnn, "bias_ih" + bwd) + getattr(rnn, "bias_hh" + bwd)])
            w_hh = torch.stack([getattr(rnn, "weight_hh" + fwd), getattr(rnn, "weight_hh" + bwd)])
            x, h_last = bidirectional_layer(x, mask, w_ih, bias, w_hh)
        return x, torch.cat([h_last[0], h_last[1]], dim=-1)
