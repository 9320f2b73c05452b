"""The LSTM decoder: bridge, one step, and the teacher-forced pass over a whole target.

All three model families share this decoder and differ only in how the context reaches it:

- ``context_before_rnn`` (Bahdanau; no attention): the context is computed from the *previous*
  state and fed to the LSTM together with the previous word (Bahdanau et al. 2015, A.1.2; for no
  attention the context is the constant encoder summary, as in Cho et al. 2014).
- otherwise (Luong): the context is computed from the *current* LSTM output (Luong et al. 2015,
  section 3); with ``input_feeding`` the previous attentional state h~ is fed to the LSTM (3.3).

Every family then forms the attentional hidden state h~ = tanh(W_c [h; c]), which the output layer
turns into logits. The LSTM is one ``nn.LSTM``: the whole target at once where no step depends on
an earlier step's attention (``forward_parallel``), its parameters one step at a time otherwise.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from seq2seq.model.attention import Attention, AttentionMemory, DecoderSelfAttention, pad_sources


class DecoderState(NamedTuple):
    hidden: torch.Tensor  # (L, B, H)
    cell: torch.Tensor  # (L, B, H) float32
    feed: torch.Tensor  # (B, P) previous attentional state h~ (zeros before the first step)
    # (B,) int64 target position of the next step, for attentions that read it (local-m); else None
    step: torch.Tensor | None = None
    # (B, S) float32 attention each source position has had so far, for coverage models; else None
    coverage: torch.Tensor | None = None
    # (B, W, 2H) float32 keys and values of the decoder self-attention, column j for target
    # position j (< step; later columns are stale), for decoders that attend over themselves; else None
    history: torch.Tensor | None = None

    # What search does with rows of states (seq2seq/search/continuous.py): select, take a range,
    # concatenate, overwrite some rows, and widen the source axis of the coverage vector.

    def select(self, index: torch.Tensor) -> DecoderState:
        return DecoderState(self.hidden.index_select(1, index), self.cell.index_select(1, index),
                            *(None if x is None else x.index_select(0, index) for x in self[2:]))

    def rows(self, start: int, stop: int) -> DecoderState:
        """Rows ``start:stop`` (views)."""
        return DecoderState(self.hidden[:, start:stop], self.cell[:, start:stop],
                            *(None if x is None else x[start:stop] for x in self[2:]))

    def _history_width(self, width: int) -> DecoderState:
        if self.history is None or self.history.size(1) >= width:
            return self
        return self._replace(history=pad_sources(self.history, width))

    def widen(self, width: int) -> DecoderState:
        """The state over a source axis of ``width`` positions: a coverage vector gets unseen ones."""
        if self.coverage is None or self.coverage.size(1) >= width:
            return self
        return self._replace(coverage=pad_sources(self.coverage, width))

    @staticmethod
    def cat(states: list[DecoderState], width: int) -> DecoderState:
        """The states' rows as one fresh state over a source axis of ``width`` positions."""
        states = [s.widen(width) for s in states]
        if states[0].history is not None:
            columns = max(s.history.size(1) for s in states)
            states = [s._history_width(columns) for s in states]
        return DecoderState(torch.cat([s.hidden for s in states], dim=1), torch.cat([s.cell for s in states], dim=1),
                            *(None if xs[0] is None else torch.cat(xs) for xs in zip(*(s[2:] for s in states))))

    def put(self, rows: torch.Tensor, src: DecoderState, width: int) -> DecoderState:
        """This state with its rows ``rows`` overwritten (in place) by ``src``'s, widened to ``width``
        first. A fresh state may differ in dtype from a decoded one: bf16 from the bridge under
        autocast, float32 from the LSTM cell."""
        dest, src = self.widen(width), src.widen(width)
        if dest.history is not None:
            columns = max(dest.history.size(1), src.history.size(1))
            dest, src = dest._history_width(columns), src._history_width(columns)
        for axis, d, s in ((1, dest.hidden, src.hidden), (1, dest.cell, src.cell), (0, dest.feed, src.feed)):
            d.index_copy_(axis, rows, s.to(d.dtype))
        for d, s in ((dest.step, src.step), (dest.coverage, src.coverage), (dest.history, src.history)):
            if d is not None:
                d.index_copy_(0, rows, s)
        return dest


class DecoderOutput(NamedTuple):
    hidden: torch.Tensor  # (B, T, P) attentional states h~, before the output layer
    attention: torch.Tensor | None  # (B, T, S)
    logits: torch.Tensor | None  # (B, T, V) only when the pass needed them (scheduled sampling)


def lstm_cell(gates: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, c') from gate pre-activations (B, 4H) in nn.LSTM's order i, f, g, o. The cell state
    and the non-linearities are float32 whatever the matmul's dtype: c accumulates over every step."""
    i, f, g, o = gates.float().chunk(4, dim=-1)
    cell = torch.sigmoid(f) * cell.float() + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(cell), cell


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, embedding_size: int, hidden_size: int, num_layers: int,
                 context_size: int, output_size: int, attention: Attention, context_before_rnn: bool,
                 input_feeding: bool, dropout: float, pad_id: int, self_attention: bool = False) -> None:
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
        # model.decoder_self_attention: the top LSTM output h_t becomes h_t + s_t (attention.py)
        self.self_attention = DecoderSelfAttention(hidden_size) if self_attention else None

    @property
    def parallel(self) -> bool:
        """True when no step depends on an earlier step's attention, so teacher-forced training
        can run the LSTM over the whole target at once and attend for all steps in one matmul."""
        return (not self.input_feeding and not self.attention.uses_coverage
                and (not self.context_before_rnn or self.attention.query_free))

    def init_state(self, summary: torch.Tensor, mask: torch.Tensor | None = None) -> DecoderState:
        """The state before the first step, from the encoder summary (and the source mask
        (B, S), which a coverage model needs for its empty coverage vector)."""
        b = summary.size(0)
        init = self.bridge(summary).view(b, 2, self.num_layers, self.hidden_size)
        hidden = torch.tanh(init[:, 0]).transpose(0, 1).contiguous()  # (L, B, H)
        cell = init[:, 1].transpose(0, 1).float().contiguous()  # (L, B, H), float32 (see lstm_cell)
        feed = summary.new_zeros(b, self.output_size)
        step = (torch.zeros(b, dtype=torch.long, device=summary.device)
                if self.attention.needs_positions or self.self_attention is not None else None)
        history = None
        if self.self_attention is not None:  # no step yet: an empty cache, widened as steps come
            history = torch.zeros(b, 0, 2 * self.hidden_size, dtype=torch.float32, device=summary.device)
        coverage = None
        if self.attention.uses_coverage:
            if mask is None:
                raise ValueError("a coverage model's initial state needs the source mask")
            coverage = torch.zeros(mask.shape, dtype=torch.float32, device=summary.device)
        return DecoderState(hidden, cell, feed, step, coverage, history)

    def attentional(self, rnn_out: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """h~ = tanh(W_c [h; c]), (..., P) float32."""
        joined = torch.cat([rnn_out.to(context.dtype), context], dim=-1)
        return torch.tanh(self.combine(joined).float())

    def rnn_step(self, x: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, torch.Tensor]:
        """Every LSTM layer for one step from layer 0's input ``x`` (B, I), with nn.LSTM's own
        parameters (and its dropout between layers): the new (L, B, H) hidden and cell states."""
        rnn, hs, cs = self.rnn, [], []
        for k in range(self.num_layers):
            if k > 0:
                x = F.dropout(x, rnn.dropout, self.training)
            gates = (F.linear(x, getattr(rnn, f"weight_ih_l{k}"), getattr(rnn, f"bias_ih_l{k}"))
                     + F.linear(state.hidden[k], getattr(rnn, f"weight_hh_l{k}"), getattr(rnn, f"bias_hh_l{k}")))
            h, c = lstm_cell(gates, state.cell[k])
            hs.append(h)
            cs.append(c)
            x = h
        return torch.stack(hs), torch.stack(cs)

    def attend(self, query: torch.Tensor, memory: AttentionMemory, positions: torch.Tensor | None = None,
               coverage: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention for one step's queries (N, Q): context (N, D) and weights (N, S) or None;
        ``positions`` (N,): each query's target position, for the attentions that read it.

        The memory may hold fewer rows than there are queries: N = G x its B rows, the G queries of
        memory row b being rows b*G .. b*G+G-1 (beam search's K beams of one sentence). They attend
        as G queries of one row, so the source is read once per sentence, not once per beam."""
        rows = memory.mask.size(0)
        group = query.size(0) // rows
        context, weights = self.attention(query.view(rows, group, -1), memory,
                                          None if positions is None else positions.view(rows, group),
                                          None if coverage is None else coverage.view(rows, group, -1))
        return (context.reshape(query.size(0), -1),
                None if weights is None else weights.reshape(query.size(0), -1))

    def step(self, emb: torch.Tensor, state: DecoderState, memory: AttentionMemory
             ) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        """One step from the embedded previous word ``emb`` (B, E): h~ (B, P), the new state and
        the attention weights (B, S) or None."""
        if self.context_before_rnn:  # from the previous state
            context, weights = self.attend(state.hidden[-1], memory, state.step, state.coverage)
            hidden, cell = self.rnn_step(torch.cat([emb, context.to(emb.dtype)], dim=-1), state)
        else:
            x = torch.cat([emb, state.feed.to(emb.dtype)], dim=-1) if self.input_feeding else emb
            hidden, cell = self.rnn_step(x, state)
        out, history = hidden[-1], state.history
        if self.self_attention is not None:
            own, history = self.self_attention.step(out, state.history, state.step)
            out = out + self.dropout(own)
        if not self.context_before_rnn:
            context, weights = self.attend(out, memory, state.step, state.coverage)  # from the current state
        h_tilde = self.attentional(out, context)
        step = None if state.step is None else state.step + 1
        # The coverage vector enters later scores as a constant: back-propagating through it chains
        # every step's attention to all earlier ones, a path with no gate that compounds over the
        # target length. On the synthetic corpus's long sentences it drove the gradient norm to
        # hundreds within 1,000 updates (clipping then starved every other update) and the model
        # never learned; the coverage loss still trains the attention through the weights.
        coverage = None if state.coverage is None else state.coverage + weights.detach().float()
        return h_tilde, DecoderState(hidden, cell, h_tilde, step, coverage, history), weights

    def forward_parallel(self, tgt_in: torch.Tensor, state: DecoderState, memory: AttentionMemory) -> DecoderOutput:
        """Teacher-forced pass over the whole target at once (``parallel`` decoders)."""
        emb = self.dropout(self.embedding(tgt_in))  # (B, T, E)
        if self.context_before_rnn:  # query-free (no attention): one context for every step
            query = state.hidden[-1].unsqueeze(1).expand(-1, tgt_in.size(1), -1)
            context, weights = self.attention(query, memory)
            rnn_in = torch.cat([emb, context.to(emb.dtype)], dim=-1)
        else:
            rnn_in = emb
        out, _ = self.rnn(rnn_in, (state.hidden, state.cell.to(state.hidden.dtype)))  # (B, T, H)
        if self.self_attention is not None:  # each step over the steps up to it, all at once
            out = out + self.dropout(self.self_attention.whole(out))
        if not self.context_before_rnn:
            positions = None
            if state.step is not None:  # every query's target position: t = start + 0 .. T-1
                positions = state.step.unsqueeze(1) + torch.arange(tgt_in.size(1), device=tgt_in.device)
            context, weights = self.attention(out, memory, positions)  # all T queries in one batched matmul
        h_tilde = self.dropout(self.attentional(out, context))
        return DecoderOutput(hidden=h_tilde, attention=weights, logits=None)

    def forward_steps(self, tgt_in: torch.Tensor, state: DecoderState, memory: AttentionMemory,
                      project: nn.Module | None = None, teacher_forcing: float = 1.0) -> DecoderOutput:
        """Step-by-step teacher-forced pass. With ``teacher_forcing`` < 1 each step feeds, per
        sentence, the gold previous word with that probability and the model's own greedy
        prediction otherwise (scheduled sampling, Bengio et al. 2015); ``project`` gives logits."""
        sampling = teacher_forcing < 1.0
        if sampling and project is None:
            raise ValueError("scheduled sampling needs the output layer")
        gold = self.dropout(self.embedding(tgt_in))  # (B, T, E)
        h_tildes, attention, logits = [], [], []
        for t in range(tgt_in.size(1)):
            emb = gold[:, t]
            if sampling and t > 0:
                use_gold = torch.rand(tgt_in[:, t].shape, device=tgt_in.device) < teacher_forcing
                own = self.dropout(self.embedding(logits[-1].argmax(-1)))
                emb = torch.where(use_gold.unsqueeze(1), emb, own)
            h_tilde, state, weights = self.step(emb, state, memory)
            h_tildes.append(h_tilde)
            if weights is not None:
                attention.append(weights)
            if sampling:
                logits.append(project(self.dropout(h_tilde)))
        return DecoderOutput(
            hidden=self.dropout(torch.stack(h_tildes, dim=1)),
            attention=torch.stack(attention, dim=1) if attention else None,
            logits=torch.stack(logits, dim=1) if sampling else None,
        )
