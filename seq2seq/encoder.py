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
        if emb.device.type == "cpu" and not self.training and not torch.is_grad_enabled():
            out, summary = self._cpu_inference_layers(emb, src_lengths, src_mask)
            return EncoderOutput(outputs=out, mask=src_mask, summary=summary)
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

    def _cpu_inference_layers(self, x: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference on the CPU: each direction as one oneDNN LSTM call over the padded batch,
        about three times faster than the step loop (which training needs for its backward).

        Padding must never enter a recurrence. It comes after each sentence, so the forward
        direction reads real tokens first and its outputs there are exact; the backward direction
        runs forward over every sentence reversed in place (padding still at the end), and its
        outputs are reversed back. Each direction's final state is its output at the sentence's
        last position read."""
        steps = x.size(1)
        t = torch.arange(steps, device=x.device)
        last = (lengths.to(x.device) - 1).clamp(min=0)  # position of the last real token
        # per sentence: position len-1-t for the real tokens, padding where it is (an involution)
        flip = torch.where(t < lengths.to(x.device).unsqueeze(1), last.unsqueeze(1) - t, t)  # (B, S)
        rows = torch.arange(x.size(0), device=x.device)
        keep = mask.unsqueeze(-1)
        rnn = self.rnn
        for k in range(rnn.num_layers):
            fwd = self._direction(x, f"_l{k}")
            bwd = self._direction(x.gather(1, flip.unsqueeze(-1).expand_as(x)), f"_l{k}_reverse")
            summary = torch.cat([fwd[rows, last], bwd[rows, last]], dim=-1).float()  # as the step loop gives
            bwd = bwd.gather(1, flip.unsqueeze(-1).expand_as(bwd))
            x = torch.cat([fwd, bwd], dim=-1) * keep  # zero at padding, as the packed path gives
        return x, summary

    def _direction(self, x: torch.Tensor, suffix: str) -> torch.Tensor:
        """One direction of one layer, read left to right over (B, S, I): outputs (B, S, H)."""
        rnn = self.rnn
        weights = [getattr(rnn, name + suffix) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        zeros = x.new_zeros(1, x.size(0), rnn.hidden_size)
        # the call nn.LSTM makes, here with one direction's parameters (nn.LSTM has no public way
        # to run one direction of a bidirectional module)
        out, _, _ = torch._VF.lstm(x, (zeros, zeros), weights, True, 1, 0.0, False, False, True)
        return out

