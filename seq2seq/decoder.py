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

from seq2seq import shapes
from seq2seq.attention import AdditiveAttention, Attention, AttentionMemory, MultiplicativeAttention
from seq2seq.bahdanauloop import bahdanau_loop
from seq2seq.dropout import Dropout, dropout
from seq2seq.feedloop import feed_loop
from seq2seq.lstm import lstm_cell
from seq2seq.steplinear import SharedWeight


class DecoderState(NamedTuple):
    hidden: torch.Tensor  # (L, B, H)
    cell: torch.Tensor  # (L, B, H)
    feed: torch.Tensor  # (B, P) previous attentional state h~ (zeros before the first step)

    def select(self, index: torch.Tensor) -> DecoderState:
        return DecoderState(self.hidden.index_select(1, index), self.cell.index_select(1, index),
                            self.feed.index_select(0, index))


class StepWeights(NamedTuple):
    """The parameters the step loop applies at every step, wrapped for one pass."""

    layer0: SharedWeight  # layer 0's one matmul per step (see Decoder._rnn_step)
    joint: bool  # ``layer0`` includes the word-embedding columns (search), with ``layer0_bias``
    layer0_bias: torch.Tensor  # layer 0's two biases summed
    hh: list[SharedWeight]  # layers 1..: weight_hh_l<k>
    ih: list[SharedWeight]  # layers 1..: weight_ih_l<k>
    bias: list[torch.Tensor]  # layers 1..: both biases summed
    query: SharedWeight | None  # additive attention's query projection
    combine: SharedWeight | None  # W_c, when h~ is fed back or with ``joint``


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
        self.dropout = Dropout(dropout)
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
        # The cell state stays float32 under bf16 autocast: it accumulates over every step.
        cell = init[:, 1].transpose(0, 1).float().contiguous()  # (L, B, H)
        feed = summary.new_zeros(b, self.output_size)
        return DecoderState(hidden, cell, feed)

    def _attentional(self, rnn_out: torch.Tensor, context: torch.Tensor, combine: SharedWeight | None = None
                     ) -> torch.Tensor:
        """h~ = tanh(W_c [h; c]), (B, T, P); ``combine``: W_c as the step loop shares it."""
        # one dtype before the cat (the matmul would cast to the context's dtype anyway), so the
        # cat is a plain copy, not a type-promoting one
        joined = torch.cat([rnn_out.to(context.dtype), context], dim=-1)
        pre = (shapes.linear(joined, self.combine.weight, self.combine.bias) if combine is None
               else combine(joined) + self.combine.bias)
        # Non-linearities run in float32 even under bf16 autocast: on CPU a bf16 tanh costs several
        # times a float32 one, and the matmul before it is where bf16 pays.
        return torch.tanh(pre.float())

    # -------------------------------------------------------------- the fused step
    # The step-by-step paths do not call nn.LSTM once per step (a full RNN call per time step costs
    # far more than its arithmetic). They use nn.LSTM's own parameters, with layer 0's three inputs
    # (word, context or fed-back h~, previous state) in one matmul per step: in training the word's
    # part is computed for all steps at once before the loop and the step's matmul covers the
    # other two; in search, where the word is known only one step ahead, it covers all three.
    # Same numbers as nn.LSTM, a fraction of the ops.

    def _embedding_gates(self, emb: torch.Tensor) -> torch.Tensor:
        """Layer 0's gate pre-activations from the word embeddings (..., E) -> (..., 4H), biases included."""
        w = self.rnn.weight_ih_l0
        return shapes.linear(emb, w[:, : self.embedding.embedding_dim], self.rnn.bias_ih_l0 + self.rnn.bias_hh_l0)

    @property
    def _has_extra(self) -> bool:
        """Whether layer 0 has an input besides the word (the context, or the fed-back h~)."""
        return self.context_before_rnn or self.input_feeding

    def step_weights(self, joint: bool = False) -> StepWeights:
        """The weights every step uses, wrapped once per pass (see ``steplinear``): each is cast
        once and gets its gradient from one matmul over all steps. ``joint`` (search, once per
        batch): layer 0's matmul takes the embedded word too."""
        rnn, size = self.rnn, self.embedding.embedding_dim
        if joint:  # [word | extra | h] columns
            layer0 = SharedWeight(rnn.weight_ih_l0, rnn.weight_hh_l0)
        elif self._has_extra:  # [extra | h] columns
            layer0 = SharedWeight(rnn.weight_ih_l0[:, size:], rnn.weight_hh_l0)
        else:
            layer0 = SharedWeight(rnn.weight_hh_l0)
        additive = isinstance(self.attention, AdditiveAttention)
        return StepWeights(
            layer0=layer0,
            joint=joint,
            layer0_bias=rnn.bias_ih_l0 + rnn.bias_hh_l0,
            hh=[SharedWeight(getattr(rnn, f"weight_hh_l{k}")) for k in range(1, self.num_layers)],
            ih=[SharedWeight(getattr(rnn, f"weight_ih_l{k}")) for k in range(1, self.num_layers)],
            bias=[getattr(rnn, f"bias_ih_l{k}") + getattr(rnn, f"bias_hh_l{k}") for k in range(1, self.num_layers)],
            query=SharedWeight(self.attention.query_proj.weight) if additive else None,
            # search forms h~ at every step either way; training without input feeding forms it
            # for all steps at once after the loop
            combine=SharedWeight(self.combine.weight) if self.input_feeding or joint else None,
        )

    def _rnn_step(self, word: torch.Tensor, extra: torch.Tensor | None, state: DecoderState, w: StepWeights
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """All layers for one step. ``word``: layer 0's gate pre-activations from the word (B, 4H),
        biases included, or with ``w.joint`` the embedded word itself (B, E); ``extra`` the context
        or the fed-back h~ (layer 0's other input). Returns the new (L, B, H) hidden and cell states."""
        inputs = [state.hidden[0]] if extra is None else [extra, state.hidden[0]]
        if w.joint:
            gates = w.layer0(torch.cat([word, *inputs], dim=1)) + w.layer0_bias
        else:
            gates = word + w.layer0(inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1))
        # float32 non-linearities and cell state (see _attentional), one autograd node
        h, c = lstm_cell(gates, state.cell[0])
        if self.num_layers == 1:
            return h.unsqueeze(0), c.unsqueeze(0)
        hs, cs = [h], [c]
        for layer in range(1, self.num_layers):
            below = dropout(hs[-1], self.rnn.dropout, self.training)
            gates = w.ih[layer - 1](below) + w.bias[layer - 1] + w.hh[layer - 1](state.hidden[layer])
            h, c = lstm_cell(gates, state.cell[layer])
            hs.append(h)
            cs.append(c)
        return torch.stack(hs), torch.stack(cs)

    def _attend(self, query: torch.Tensor, memory: AttentionMemory, w: StepWeights
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention for one step's queries (N, Q): context (N, D) and weights (N, S) or None.

        The memory may hold fewer rows than there are queries: N = G x its B rows, the G queries of
        memory row b being rows b*G .. b*G+G-1 (beam search's K beams of one sentence). They attend
        as G queries of one row, so the source is read once per sentence, not once per beam."""
        rows = memory.mask.size(0)
        group = query.size(0) // rows
        if w.query is not None:
            projected = w.query(query) + self.attention.query_proj.bias
            context, weights = self.attention.attend_projected(projected.view(rows, group, -1), memory)
        else:
            context, weights = self.attention(query.view(rows, group, -1), memory)
        return (context.reshape(query.size(0), -1),
                None if weights is None else weights.reshape(query.size(0), -1))

    def _step(self, word: torch.Tensor, state: DecoderState, memory: AttentionMemory, w: StepWeights
              ) -> tuple[torch.Tensor, torch.Tensor, DecoderState, torch.Tensor | None]:
        """One step from the word (see ``_rnn_step``): returns (top LSTM output h, context, new
        state, weights). h~ is formed here only when it is fed back (input feeding); otherwise the
        caller forms it."""
        if self.context_before_rnn:
            context, weights = self._attend(state.hidden[-1], memory, w)  # previous state
            h, c = self._rnn_step(word, context, state, w)
            out = h[-1]
        else:
            h, c = self._rnn_step(word, state.feed if self.input_feeding else None, state, w)
            out = h[-1]
            context, weights = self._attend(out, memory, w)  # current state
        if self.input_feeding:
            feed = self._attentional(out, context, w.combine)
        else:
            feed = state.feed
        return out, context, DecoderState(h, c, feed), weights

    def step(self, emb: torch.Tensor, state: DecoderState, memory: AttentionMemory,
             weights: StepWeights | None = None) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        """One step. ``emb`` (B, E) is the embedded previous word; returns h~ (B, P), the new
        state and the attention weights (B, S) or None. ``weights``: from ``step_weights(joint=True)``."""
        weights = weights if weights is not None else self.step_weights(joint=True)
        out, context, state, attention = self._step(emb, state, memory, weights)
        if self.input_feeding:
            return state.feed, state, attention
        h_tilde = self._attentional(out, context, weights.combine)
        return h_tilde, state._replace(feed=h_tilde), attention

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

    @property
    def _one_node_loop(self) -> bool:
        """Whether teacher-forced training runs as a single autograd node: one layer, and either
        input feeding with a multiplicative score (``feedloop``) or Bahdanau's additive attention
        read before the LSTM step (``bahdanauloop``)."""
        if self.num_layers != 1:
            return False
        if self.input_feeding:
            return isinstance(self.attention, MultiplicativeAttention)
        return self.context_before_rnn and isinstance(self.attention, AdditiveAttention)

    def _forward_feed_loop(self, tgt_in: torch.Tensor, state: DecoderState, memory: AttentionMemory
                           ) -> DecoderOutput:
        size = self.embedding.embedding_dim
        # step-major (T, B, 4H), all steps in one matmul: each step reads its rows in place, and
        # their gradient comes back in that layout with no transposing copy of the 4H-wide gates
        gold = self._embedding_gates(self.dropout(self.embedding(tgt_in.t())))
        out = feed_loop(gold, state.hidden[0], state.cell[0], state.feed, self.rnn.weight_ih_l0[:, size:],
                        self.rnn.weight_hh_l0, memory.keys, memory.values, memory.mask,
                        self.combine.weight, self.combine.bias)
        return DecoderOutput(hidden=self.dropout(out.feeds), attention=out.attention, logits=None)

    def _forward_bahdanau_loop(self, tgt_in: torch.Tensor, state: DecoderState, memory: AttentionMemory
                               ) -> DecoderOutput:
        size, attention = self.embedding.embedding_dim, self.attention
        assert isinstance(attention, AdditiveAttention)
        gold = self._embedding_gates(self.dropout(self.embedding(tgt_in.t())))  # step-major (T, B, 4H)
        out = bahdanau_loop(gold, state.hidden[0], state.cell[0], self.rnn.weight_ih_l0[:, size:],
                            self.rnn.weight_hh_l0, attention.query_proj.weight, attention.query_proj.bias,
                            memory.keys, attention.energy.weight.view(-1), memory.values, memory.mask)
        # h~ does not feed back: formed for all steps in one matmul, as in the autograd loop
        h_tilde = self._attentional(out.outputs, out.contexts)
        return DecoderOutput(hidden=self.dropout(h_tilde), attention=out.attention, logits=None)

    def forward_steps(self, tgt_in: torch.Tensor, state: DecoderState, memory: AttentionMemory,
                      project: nn.Module | None = None, teacher_forcing: float = 1.0) -> DecoderOutput:
        """Step-by-step teacher-forced pass. With ``teacher_forcing`` < 1 each step feeds, per
        sentence, the gold previous word with that probability and the model's own greedy
        prediction otherwise (scheduled sampling, Bengio et al. 2015); ``project`` gives logits."""
        steps = tgt_in.size(1)
        sampling = teacher_forcing < 1.0
        if sampling and project is None:
            raise ValueError("scheduled sampling needs the output layer")
        if not sampling and self._one_node_loop:
            if self.input_feeding:
                return self._forward_feed_loop(tgt_in, state, memory)
            return self._forward_bahdanau_loop(tgt_in, state, memory)
        # The gold words' input projections for every step in one matmul (unused where sampled).
        # unbind, not [:, t]: one backward node for all steps instead of a full-size zero gradient per step
        gold_gates = self._embedding_gates(self.dropout(self.embedding(tgt_in))).unbind(1)  # T x (B, 4H)
        outs, contexts, feeds, attn, logits = [], [], [], [], []
        weights_t = self.step_weights()
        if not self.attention.query_free:  # no attention reads only the summary: nothing to share
            memory = memory.for_steps(scored_keys=isinstance(self.attention, MultiplicativeAttention))
        for t in range(steps):
            gates0 = gold_gates[t]
            if sampling and t > 0:
                use_gold = torch.rand(tgt_in[:, t].shape, device=tgt_in.device) < teacher_forcing
                predicted = logits[-1].argmax(-1)
                sampled_gates = self._embedding_gates(self.dropout(self.embedding(predicted)))
                gates0 = torch.where(use_gold.unsqueeze(1), gates0, sampled_gates)
            out, context, state, weights = self._step(gates0, state, memory, weights_t)
            if self.input_feeding:
                feeds.append(state.feed)
            else:
                outs.append(out)
                contexts.append(context)
            if weights is not None:
                attn.append(weights)
            if sampling:
                h_tilde = state.feed if self.input_feeding else self._attentional(out, context)
                logits.append(project(self.dropout(h_tilde)))
        if self.input_feeding:
            h_tilde = torch.stack(feeds, dim=1)
        else:  # h~ does not feed back: form it for all steps in one matmul
            h_tilde = self._attentional(torch.stack(outs, dim=1), torch.stack(contexts, dim=1))
        return DecoderOutput(
            hidden=self.dropout(h_tilde),
            attention=torch.stack(attn, dim=1) if attn else None,
            logits=torch.stack(logits, dim=1) if sampling else None,
        )
