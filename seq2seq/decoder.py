"""The LSTM decoder: bridge, one step, and the teacher-forced pass over a whole target.

All three model families share this decoder and differ only in how the context reaches it:

- ``context_before_rnn`` (Bahdanau; no attention): the context is computed from the *previous*
  state and fed to the LSTM together with the previous word (Bahdanau et al. 2015, A.1.2; for no
  attention the context is the constant encoder summary, as in Cho et al. 2014).
- otherwise (Luong): the context is computed from the *current* LSTM output (Luong et al. 2015,
  section 3); with ``input_feeding`` the previous attentional state h~ is fed to the LSTM (3.3).

Every family then forms the attentional hidden state h~ = tanh(W_c [h; c]), which the output layer
turns into logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from seq2seq.attention import Attention, AttentionMemory


class DecoderState(NamedTuple):
    hidden: torch.Tensor  # (L, B, H)
    cell: torch.Tensor  # (L, B, H)
    feed: torch.Tensor  # (B, P) previous attentional state h~ (zeros before the first step)

    def select(self, index: torch.Tensor) -> DecoderState:
        return DecoderState(self.hidden.index_select(1, index), self.cell.index_select(1, index),
                            self.feed.index_select(0, index))


class DecoderOutput(NamedTuple):
    hidden: torch.Tensor  # (B, T, P) attentional states h~, before the output layer
    attention: torch.Tensor | None  # (B, T, S)
    logits: torch.Tensor | None  # (B, T, V) only when the pass needed them (scheduled sampling)


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, embedding_size: int, hidden_size: int, num_layers: int,
                 context_size: int, output_size: int, attention: Attention, context_before_rnn: bool,
                 input_feeding: bool, dropout: float, pad_id: int) -> None:
        super().__init__()
        if context_before_rnn and input_feeding:
            raise ValueError("input feeding applies to attention computed after the LSTM step")
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=pad_id)
        self.dropout = nn.Dropout(dropout)
        self.attention = attention
        self.context_before_rnn = context_before_rnn
        self.input_feeding = input_feeding
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.output_size = output_size
        extra = context_size if context_before_rnn else output_size if input_feeding else 0
        self.rnn = nn.LSTM(embedding_size + extra, hidden_size, num_layers=num_layers,
                           batch_first=True, dropout=dropout if num_layers > 1 else 0.0)
        # Bridge: initial (h, c) of every layer from the encoder summary.
        self.bridge = nn.Linear(context_size, 2 * num_layers * hidden_size)
        self.combine = nn.Linear(hidden_size + context_size, output_size)  # W_c

    @property
    def parallel(self) -> bool:
        """True when no step depends on an earlier step's attention, so teacher-forced training
        can run the LSTM over the whole target at once and attend for all steps in one matmul."""
        return not self.input_feeding and (not self.context_before_rnn or self.attention.query_free)

    def init_state(self, summary: torch.Tensor) -> DecoderState:
        b = summary.size(0)
        init = self.bridge(summary).view(b, 2, self.num_layers, self.hidden_size)
        hidden = torch.tanh(init[:, 0]).transpose(0, 1).contiguous()  # (L, B, H)
        cell = init[:, 1].transpose(0, 1).contiguous()  # (L, B, H)
        feed = summary.new_zeros(b, self.output_size)
        return DecoderState(hidden, cell, feed)

    def _attentional(self, rnn_out: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # h~ = tanh(W_c [h; c]), (B, T, P)
        return torch.tanh(self.combine(torch.cat([rnn_out, context], dim=-1)))

    def step(self, emb: torch.Tensor, state: DecoderState, memory: AttentionMemory
             ) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        """One step. ``emb`` (B, E) is the embedded previous word; returns h~ (B, P), the new
        state and the attention weights (B, S) or None."""
        emb = emb.unsqueeze(1)  # (B, 1, E)
        weights = None
        if self.context_before_rnn:
            prev = state.hidden[-1].unsqueeze(1)  # (B, 1, H): previous top-layer state
            context, weights = self.attention(prev, memory)
            rnn_in = torch.cat([emb, context], dim=-1)
        elif self.input_feeding:
            rnn_in = torch.cat([emb, state.feed.unsqueeze(1)], dim=-1)
        else:
            rnn_in = emb
        out, (h, c) = self.rnn(rnn_in, (state.hidden, state.cell))  # out (B, 1, H)
        if not self.context_before_rnn:
            context, weights = self.attention(out, memory)
        h_tilde = self._attentional(out, context).squeeze(1)  # (B, P)
        return h_tilde, DecoderState(h, c, h_tilde), None if weights is None else weights.squeeze(1)

    def forward_parallel(self, tgt_in: torch.Tensor, state: DecoderState, memory: AttentionMemory) -> DecoderOutput:
        emb = self.dropout(self.embedding(tgt_in))  # (B, T, E)
        if self.context_before_rnn:  # query-free (no attention): one context for every step
            query = state.hidden[-1].unsqueeze(1).expand(-1, tgt_in.size(1), -1)
            context, weights = self.attention(query, memory)
            out, _ = self.rnn(torch.cat([emb, context], dim=-1), (state.hidden, state.cell))
        else:
            out, _ = self.rnn(emb, (state.hidden, state.cell))  # (B, T, H), cuDNN on GPU
            context, weights = self.attention(out, memory)  # all T queries in one batched matmul
        h_tilde = self.dropout(self._attentional(out, context))
        return DecoderOutput(hidden=h_tilde, attention=weights, logits=None)

    def forward_steps(self, tgt_in: torch.Tensor, state: DecoderState, memory: AttentionMemory,
                      project: nn.Module | None = None, teacher_forcing: float = 1.0) -> DecoderOutput:
        """Step-by-step teacher-forced pass. With ``teacher_forcing`` < 1 each step feeds, per
        sentence, the gold previous word with that probability and the model's own greedy
        prediction otherwise (scheduled sampling, Bengio et al. 2015); ``project`` gives logits."""
        steps = tgt_in.size(1)
        sampling = teacher_forcing < 1.0
        if sampling and project is None:
            raise ValueError("scheduled sampling needs the output layer")
        outputs, attn, logits = [], [], []
        prev = tgt_in[:, 0]
        for t in range(steps):
            if t > 0:
                prev = tgt_in[:, t]
                if sampling:
                    use_gold = torch.rand(prev.shape, device=prev.device) < teacher_forcing
                    prev = torch.where(use_gold, prev, logits[-1].argmax(-1))
            h_tilde, state, weights = self.step(self.dropout(self.embedding(prev)), state, memory)
            h_tilde = self.dropout(h_tilde)
            outputs.append(h_tilde)
            if weights is not None:
                attn.append(weights)
            if sampling:
                logits.append(project(h_tilde))
        return DecoderOutput(
            hidden=torch.stack(outputs, dim=1),
            attention=torch.stack(attn, dim=1) if attn else None,
            logits=torch.stack(logits, dim=1) if sampling else None,
        )
