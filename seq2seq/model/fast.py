"""The fast engine: the reference model's parameters run through the CPU kernels.

Everything here computes what the reference modules compute (``encoder.py``, ``attention.py``,
``decoder.py``, ``network.py``), on the same parameters, with ``seq2seq.kernels`` doing the work:

- encoder: the bi-LSTM step loop with a hand-written backward (``kernels.lstm``) in training, one
  oneDNN call per direction at inference (oneDNN's per-shape kernels cost a cold first update and
  a growing cache when the backward needs them);
- decoder, teacher-forced: the one-node loops (``kernels.feedloop``: one layer, Luong dot/general
  with input feeding; ``kernels.bahdanauloop``: one layer, Bahdanau), else a fused step loop whose
  per-step weights get their gradients from one matmul over all steps (``kernels.steplinear``),
  else (parallel decoders) nn.LSTM over the whole target;
- search: the step weights cast and packed once into oneDNN's blocked layout, the output bias
  fused into the packed product, freed memory kept in the process (``kernels.heap``);
- everywhere: matmul row counts padded so oneDNN's kernels repeat (``kernels.shapes``), the cheaper
  dropout mask (``kernels.dropout``), the additive score without its activation kept
  (``kernels.scores``), the output layer and loss in row chunks (``kernels.losses``).

Tests compare every path here with the reference: logits, every gradient, search outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from seq2seq.data.batching import Batch
from seq2seq.kernels import shapes
from seq2seq.kernels.bahdanauloop import bahdanau_loop
from seq2seq.kernels.compat import vf_lstm
from seq2seq.kernels.dropout import dropout
from seq2seq.kernels.feedloop import feed_loop
from seq2seq.kernels.heap import retained_heap
from seq2seq.kernels.losses import cross_entropy, output_cross_entropy
from seq2seq.kernels.lstm import bidirectional_layer, lstm_cell
from seq2seq.kernels.scores import additive_scores
from seq2seq.kernels.steplinear import SharedWeight
from seq2seq.model.attention import (
    AdditiveAttention,
    AttentionMemory,
    MultiplicativeAttention,
    masked_softmax,
)
from seq2seq.model.decoder import Decoder, DecoderOutput, DecoderState
from seq2seq.model.encoder import Encoder, EncoderOutput
from seq2seq.model.network import EncodedSource, Seq2Seq, StepOutput


class StepWeights(NamedTuple):
    """The decoder parameters a step loop applies at every step, wrapped for one pass."""

    layer0: SharedWeight  # layer 0's one matmul per step (see FastDecoder._rnn_step)
    joint: bool  # ``layer0`` includes the word-embedding columns (search), with ``layer0_bias``
    layer0_bias: torch.Tensor  # layer 0's two biases summed
    hh: list[SharedWeight]  # layers 1..: weight_hh_l<k>
    ih: list[SharedWeight]  # layers 1..: weight_ih_l<k>
    bias: list[torch.Tensor]  # layers 1..: both biases summed
    query: SharedWeight | None  # additive attention's query projection
    combine: SharedWeight | None  # W_c, when h~ is fed back or with ``joint``


class SearchWeights(NamedTuple):
    """What a search applies at every step, prepared once per call (cast, and packed on the CPU)."""

    decoder: StepWeights
    output: SharedWeight  # the output layer's weight; its bias is added in float32


class _StepMemory(NamedTuple):
    """The attention memory of a step loop with gradients: the two matmuls with keys and values
    as shared weights, so that their gradients are formed once for all steps."""

    memory: AttentionMemory
    key_matmul: SharedWeight | None  # query . key, for multiplicative scores
    value_matmul: SharedWeight | None

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """query . key for (B, T, K) queries: (B, T, S)."""
        if self.key_matmul is not None:
            return self.key_matmul(query)
        return torch.bmm(query, self.memory.keys.transpose(1, 2))

    def read(self, weights: torch.Tensor) -> torch.Tensor:
        if self.value_matmul is not None:
            return self.value_matmul(weights)
        return torch.bmm(weights, self.memory.values)


def _step_memory(memory: AttentionMemory, scored_keys: bool) -> _StepMemory:
    if not torch.is_grad_enabled():
        return _StepMemory(memory, None, None)
    return _StepMemory(memory, SharedWeight(memory.keys) if scored_keys else None,
                       SharedWeight(memory.values.transpose(1, 2)))


# ------------------------------------------------------------------ encoder


def encode_source(encoder: Encoder, src: torch.Tensor, src_lengths: torch.Tensor, src_mask: torch.Tensor
                  ) -> EncoderOutput:
    p = encoder.dropout.p
    emb = dropout(encoder.embedding(src), p, encoder.training)  # (B, S, E)
    if not encoder.training and not torch.is_grad_enabled() and vf_lstm() is not None:
        out, summary = _inference_layers(encoder.rnn, emb, src_lengths, src_mask)
        return EncoderOutput(outputs=out, mask=src_mask, summary=summary)
    out, summary = _training_layers(encoder.rnn, emb, src_mask, encoder.training)
    return EncoderOutput(outputs=dropout(out, p, encoder.training), mask=src_mask, summary=summary)


def _training_layers(rnn: nn.LSTM, x: torch.Tensor, mask: torch.Tensor, training: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    for k in range(rnn.num_layers):
        if k > 0:
            x = dropout(x, rnn.dropout, training)  # as nn.LSTM, between layers
        fwd, bwd = f"_l{k}", f"_l{k}_reverse"
        w_ih = torch.cat([getattr(rnn, "weight_ih" + fwd), getattr(rnn, "weight_ih" + bwd)])
        bias = torch.cat([getattr(rnn, "bias_ih" + fwd) + getattr(rnn, "bias_hh" + fwd),
                          getattr(rnn, "bias_ih" + bwd) + getattr(rnn, "bias_hh" + bwd)])
        w_hh = torch.stack([getattr(rnn, "weight_hh" + fwd), getattr(rnn, "weight_hh" + bwd)])
        x, h_last = bidirectional_layer(x, mask, w_ih, bias, w_hh)
    return x, torch.cat([h_last[0], h_last[1]], dim=-1)


def _inference_layers(rnn: nn.LSTM, x: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference: each direction as one oneDNN LSTM call over the padded batch, about three times
    faster than the step loop (which training needs for its backward).

    Padding must never enter a recurrence. It comes after each sentence, so the forward direction
    reads real tokens first and its outputs there are exact; the backward direction runs forward
    over every sentence reversed in place (padding still at the end), and its outputs are
    reversed back. Each direction's final state is its output at the sentence's last position read."""
    steps = x.size(1)
    t = torch.arange(steps, device=x.device)
    last = (lengths.to(x.device) - 1).clamp(min=0)  # position of the last real token
    # per sentence: position len-1-t for the real tokens, padding where it is (an involution)
    flip = torch.where(t < lengths.to(x.device).unsqueeze(1), last.unsqueeze(1) - t, t)  # (B, S)
    rows = torch.arange(x.size(0), device=x.device)
    keep = mask.unsqueeze(-1)
    summary = x.new_zeros(0)
    for k in range(rnn.num_layers):
        fwd = _direction(rnn, x, f"_l{k}")
        bwd = _direction(rnn, x.gather(1, flip.unsqueeze(-1).expand_as(x)), f"_l{k}_reverse")
        summary = torch.cat([fwd[rows, last], bwd[rows, last]], dim=-1).float()  # as the step loop gives
        bwd = bwd.gather(1, flip.unsqueeze(-1).expand_as(bwd))
        x = torch.cat([fwd, bwd], dim=-1) * keep  # zero at padding, as the packed path gives
    return x, summary


def _direction(rnn: nn.LSTM, x: torch.Tensor, suffix: str) -> torch.Tensor:
    """One direction of one layer, read left to right over (B, S, I): outputs (B, S, H)."""
    weights = [getattr(rnn, name + suffix) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    zeros = x.new_zeros(1, x.size(0), rnn.hidden_size)
    # the call nn.LSTM makes, here with one direction's parameters (nn.LSTM has no public way
    # to run one direction of a bidirectional module)
    out, _, _ = vf_lstm()(x, (zeros, zeros), weights, True, 1, 0.0, False, False, True)
    return out


def prepare_memory(decoder: Decoder, enc: EncoderOutput) -> AttentionMemory:
    """``decoder.attention.prepare`` with the key projection's rows padded (``shapes``); additive
    keys in float32, cast once per batch: the per-step tanh over (B, S, A) is the costliest
    element-wise work of a step, and on the CPU several times slower in bf16."""
    attention = decoder.attention
    if isinstance(attention, AdditiveAttention):
        keys = shapes.linear(enc.outputs, attention.key_proj.weight).float()
    elif isinstance(attention, MultiplicativeAttention) and attention.general:
        keys = shapes.linear(enc.outputs, attention.key_proj.weight)
    else:
        return attention.prepare(enc)
    return AttentionMemory(keys=keys, values=enc.outputs, mask=enc.mask)


# ------------------------------------------------------------------ decoder


class FastDecoder:
    """The decoder's passes over its own parameters, through the kernels.

    The step paths do not call nn.LSTM once per step (a full RNN call per time step costs far more
    than its arithmetic). They use nn.LSTM's parameters, with layer 0's three inputs (word, context
    or fed-back h~, previous state) in one matmul per step: in training the word's part is
    computed for all steps at once before the loop and the step's matmul covers the other two;
    in search, where the word is known only one step ahead, it covers all three."""

    def __init__(self, decoder: Decoder) -> None:
        self.d = decoder

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.d.dropout.p, self.d.training)

    def attentional(self, rnn_out: torch.Tensor, context: torch.Tensor, combine: SharedWeight | None = None
                    ) -> torch.Tensor:
        """h~ = tanh(W_c [h; c]), (B, T, P); ``combine``: W_c as the step loop shares it."""
        layer = self.d.combine
        # one dtype before the cat (the matmul would cast to the context's dtype anyway), so the
        # cat is a plain copy, not a type-promoting one
        joined = torch.cat([rnn_out.to(context.dtype), context], dim=-1)
        pre = shapes.linear(joined, layer.weight, layer.bias) if combine is None else combine(joined) + layer.bias
        # Non-linearities run in float32 even under bf16 autocast: on CPU a bf16 tanh costs several
        # times a float32 one, and the matmul before it is where bf16 pays.
        return torch.tanh(pre.float())

    def _embedding_gates(self, emb: torch.Tensor) -> torch.Tensor:
        """Layer 0's gate pre-activations from the word embeddings (..., E) -> (..., 4H), biases included."""
        rnn = self.d.rnn
        return shapes.linear(emb, rnn.weight_ih_l0[:, : self.d.embedding.embedding_dim],
                             rnn.bias_ih_l0 + rnn.bias_hh_l0)

    @property
    def _has_extra(self) -> bool:
        """Whether layer 0 has an input besides the word (the context, or the fed-back h~)."""
        return self.d.context_before_rnn or self.d.input_feeding

    def step_weights(self, joint: bool = False) -> StepWeights:
        """The weights every step uses, wrapped once per pass (see ``steplinear``): each is cast
        once and gets its gradient from one matmul over all steps. ``joint`` (search, once per
        batch): layer 0's matmul takes the embedded word too."""
        d = self.d
        rnn, size = d.rnn, d.embedding.embedding_dim
        if joint:  # [word | extra | h] columns
            layer0 = SharedWeight(rnn.weight_ih_l0, rnn.weight_hh_l0)
        elif self._has_extra:  # [extra | h] columns
            layer0 = SharedWeight(rnn.weight_ih_l0[:, size:], rnn.weight_hh_l0)
        else:
            layer0 = SharedWeight(rnn.weight_hh_l0)
        additive = isinstance(d.attention, AdditiveAttention)
        return StepWeights(
            layer0=layer0,
            joint=joint,
            layer0_bias=rnn.bias_ih_l0 + rnn.bias_hh_l0,
            hh=[SharedWeight(getattr(rnn, f"weight_hh_l{k}")) for k in range(1, d.num_layers)],
            ih=[SharedWeight(getattr(rnn, f"weight_ih_l{k}")) for k in range(1, d.num_layers)],
            bias=[getattr(rnn, f"bias_ih_l{k}") + getattr(rnn, f"bias_hh_l{k}") for k in range(1, d.num_layers)],
            query=SharedWeight(d.attention.query_proj.weight) if additive else None,
            # search forms h~ at every step either way; training without input feeding forms it
            # for all steps at once after the loop
            combine=SharedWeight(d.combine.weight) if d.input_feeding or joint else None,
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
        # float32 non-linearities and cell state, one autograd node
        h, c = lstm_cell(gates, state.cell[0])
        if self.d.num_layers == 1:
            return h.unsqueeze(0), c.unsqueeze(0)
        hs, cs = [h], [c]
        for layer in range(1, self.d.num_layers):
            below = dropout(hs[-1], self.d.rnn.dropout, self.d.training)
            gates = w.ih[layer - 1](below) + w.bias[layer - 1] + w.hh[layer - 1](state.hidden[layer])
            h, c = lstm_cell(gates, state.cell[layer])
            hs.append(h)
            cs.append(c)
        return torch.stack(hs), torch.stack(cs)

    def attend_all(self, query: torch.Tensor, memory: _StepMemory, w: StepWeights | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention for (B, T, Q) queries: contexts (B, T, D) and weights (B, T, S) or None."""
        attention = self.d.attention
        if isinstance(attention, AdditiveAttention):
            if w is not None and w.query is not None:
                projected = w.query(query) + attention.query_proj.bias
            else:
                projected = attention.query_proj(query)
            scores = additive_scores(projected.float().unsqueeze(2), memory.memory.keys.unsqueeze(1),
                                     attention.energy.weight.view(-1))  # (B, T, S)
        elif isinstance(attention, MultiplicativeAttention):
            scores = memory.scores(query)
        else:
            return attention(query, memory.memory)
        weights = masked_softmax(scores, memory.memory.mask)
        return memory.read(weights), weights

    def _attend(self, query: torch.Tensor, memory: _StepMemory, w: StepWeights
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention for one step's queries (N, Q), the memory's rows shared by groups of queries
        as in ``Decoder.attend``."""
        rows = memory.memory.mask.size(0)
        context, weights = self.attend_all(query.view(rows, query.size(0) // rows, -1), memory, w)
        return (context.reshape(query.size(0), -1),
                None if weights is None else weights.reshape(query.size(0), -1))

    def _step(self, word: torch.Tensor, state: DecoderState, memory: _StepMemory, w: StepWeights
              ) -> tuple[torch.Tensor, torch.Tensor, DecoderState, torch.Tensor | None]:
        """One step from the word (see ``_rnn_step``): returns (top LSTM output h, context, new
        state, weights). h~ is formed here only when it is fed back (input feeding); otherwise the
        caller forms it."""
        d = self.d
        if d.context_before_rnn:
            context, weights = self._attend(state.hidden[-1], memory, w)  # previous state
            h, c = self._rnn_step(word, context, state, w)
            out = h[-1]
        else:
            h, c = self._rnn_step(word, state.feed if d.input_feeding else None, state, w)
            out = h[-1]
            context, weights = self._attend(out, memory, w)  # current state
        feed = self.attentional(out, context, w.combine) if d.input_feeding else state.feed
        return out, context, DecoderState(h, c, feed), weights

    def step(self, emb: torch.Tensor, state: DecoderState, memory: AttentionMemory, weights: StepWeights
             ) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        """One search step (``weights`` from ``step_weights(joint=True)``): h~, state, weights."""
        out, context, state, attention = self._step(emb, state, _StepMemory(memory, None, None), weights)
        if self.d.input_feeding:
            return state.feed, state, attention
        h_tilde = self.attentional(out, context, weights.combine)
        return h_tilde, state._replace(feed=h_tilde), attention

    def forward_parallel(self, tgt_in: torch.Tensor, state: DecoderState, memory: AttentionMemory) -> DecoderOutput:
        d = self.d
        emb = self._dropout(d.embedding(tgt_in))  # (B, T, E)
        plain = _StepMemory(memory, None, None)
        if d.context_before_rnn:  # query-free (no attention): one context for every step
            query = state.hidden[-1].unsqueeze(1).expand(-1, tgt_in.size(1), -1)
            context, weights = d.attention(query, memory)
            out, _ = d.rnn(torch.cat([emb, context], dim=-1), (state.hidden, state.cell))
        else:
            out, _ = d.rnn(emb, (state.hidden, state.cell))  # (B, T, H)
            context, weights = self.attend_all(out, plain)  # all T queries in one batched matmul
        h_tilde = self._dropout(self.attentional(out, context))
        return DecoderOutput(hidden=h_tilde, attention=weights, logits=None)

    @property
    def loop(self) -> str:
        """Which teacher-forced path runs without scheduled sampling: ``feed`` / ``bahdanau``
        (one-node loops: one layer, and input feeding with a multiplicative score, or Bahdanau's
        additive attention read before the LSTM step), ``parallel`` or ``steps``."""
        d = self.d
        if d.parallel:
            return "parallel"
        if d.num_layers == 1 and d.input_feeding and isinstance(d.attention, MultiplicativeAttention):
            return "feed"
        if d.num_layers == 1 and d.context_before_rnn and isinstance(d.attention, AdditiveAttention):
            return "bahdanau"
        return "steps"

    def _feed_loop(self, tgt_in: torch.Tensor, state: DecoderState, memory: AttentionMemory) -> DecoderOutput:
        d = self.d
        size = d.embedding.embedding_dim
        # step-major (T, B, 4H), all steps in one matmul: each step reads its rows in place, and
        # their gradient comes back in that layout with no transposing copy of the 4H-wide gates
        gold = self._embedding_gates(self._dropout(d.embedding(tgt_in.t())))
        out = feed_loop(gold, state.hidden[0], state.cell[0], state.feed, d.rnn.weight_ih_l0[:, size:],
                        d.rnn.weight_hh_l0, memory.keys, memory.values, memory.mask,
                        d.combine.weight, d.combine.bias)
        return DecoderOutput(hidden=self._dropout(out.feeds), attention=out.attention, logits=None)

    def _bahdanau_loop(self, tgt_in: torch.Tensor, state: DecoderState, memory: AttentionMemory) -> DecoderOutput:
        d = self.d
        size, attention = d.embedding.embedding_dim, d.attention
        assert isinstance(attention, AdditiveAttention)
        gold = self._embedding_gates(self._dropout(d.embedding(tgt_in.t())))  # step-major (T, B, 4H)
        out = bahdanau_loop(gold, state.hidden[0], state.cell[0], d.rnn.weight_ih_l0[:, size:],
                            d.rnn.weight_hh_l0, attention.query_proj.weight, attention.query_proj.bias,
                            memory.keys, attention.energy.weight.view(-1), memory.values, memory.mask)
        # h~ does not feed back: formed for all steps in one matmul, as in the step loop
        h_tilde = self.attentional(out.outputs, out.contexts)
        return DecoderOutput(hidden=self._dropout(h_tilde), attention=out.attention, logits=None)

    def forward_steps(self, tgt_in: torch.Tensor, state: DecoderState, memory: AttentionMemory,
                      project: nn.Module | None = None, teacher_forcing: float = 1.0) -> DecoderOutput:
        """``Decoder.forward_steps`` through the one-node loops where they apply, else the fused
        step loop."""
        d = self.d
        steps = tgt_in.size(1)
        sampling = teacher_forcing < 1.0
        if sampling and project is None:
            raise ValueError("scheduled sampling needs the output layer")
        if not sampling and self.loop == "feed":
            return self._feed_loop(tgt_in, state, memory)
        if not sampling and self.loop == "bahdanau":
            return self._bahdanau_loop(tgt_in, state, memory)
        # The gold words' input projections for every step in one matmul (unused where sampled).
        # unbind, not [:, t]: one backward node for all steps instead of a full-size zero gradient per step
        gold_gates = self._embedding_gates(self._dropout(d.embedding(tgt_in))).unbind(1)  # T x (B, 4H)
        outs, contexts, feeds, attn, logits = [], [], [], [], []
        weights_t = self.step_weights()
        # no attention reads only the summary: nothing to share
        step_memory = (_StepMemory(memory, None, None) if d.attention.query_free
                       else _step_memory(memory, scored_keys=isinstance(d.attention, MultiplicativeAttention)))
        for t in range(steps):
            gates0 = gold_gates[t]
            if sampling and t > 0:
                use_gold = torch.rand(tgt_in[:, t].shape, device=tgt_in.device) < teacher_forcing
                predicted = logits[-1].argmax(-1)
                sampled_gates = self._embedding_gates(self._dropout(d.embedding(predicted)))
                gates0 = torch.where(use_gold.unsqueeze(1), gates0, sampled_gates)
            out, context, state, weights = self._step(gates0, state, step_memory, weights_t)
            if d.input_feeding:
                feeds.append(state.feed)
            else:
                outs.append(out)
                contexts.append(context)
            if weights is not None:
                attn.append(weights)
            if sampling:
                h_tilde = state.feed if d.input_feeding else self.attentional(out, context)
                logits.append(project(self._dropout(h_tilde)))
        if d.input_feeding:
            h_tilde = torch.stack(feeds, dim=1)
        else:  # h~ does not feed back: form it for all steps in one matmul
            h_tilde = self.attentional(torch.stack(outs, dim=1), torch.stack(contexts, dim=1))
        return DecoderOutput(
            hidden=self._dropout(h_tilde),
            attention=torch.stack(attn, dim=1) if attn else None,
            logits=torch.stack(logits, dim=1) if sampling else None,
        )


# ------------------------------------------------------------------ the engine


_LOOP_NAMES = {"feed": "input-feeding one-node loop (kernels.feedloop)",
               "bahdanau": "bahdanau one-node loop (kernels.bahdanauloop)",
               "parallel": "parallel nn.LSTM over the whole target",
               "steps": "fused step loop (kernels.steplinear)"}


class FastEngine:
    """The model run through ``seq2seq.kernels`` (see the module docstring)."""

    name = "fast"

    def __init__(self, model: Seq2Seq) -> None:
        self.model = model
        self.decoder = FastDecoder(model.decoder)

    def paths(self) -> dict[str, str]:
        return {"encoder": "bi-LSTM step loop with its own backward (kernels.lstm); "
                           "one oneDNN call per direction at inference",
                "decoder": _LOOP_NAMES[self.decoder.loop],
                "search": "step weights packed once (kernels.steplinear)"}

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor, src_mask: torch.Tensor) -> EncodedSource:
        enc = encode_source(self.model.encoder, src, src_lengths, src_mask)
        return EncodedSource(memory=prepare_memory(self.model.decoder, enc),
                             state=self.model.decoder.init_state(enc.summary, enc.mask))

    def forward(self, batch: Batch, teacher_forcing: float = 1.0, force_steps: bool = False) -> DecoderOutput:
        encoded = self.encode(batch.src, batch.src_lengths, batch.src_mask)
        if self.model.decoder.parallel and teacher_forcing >= 1.0 and not force_steps:
            return self.decoder.forward_parallel(batch.tgt_in, encoded.state, encoded.memory)
        return self.decoder.forward_steps(batch.tgt_in, encoded.state, encoded.memory,
                                          project=self.model.output_layer, teacher_forcing=teacher_forcing)

    def loss(self, out: DecoderOutput, batch: Batch, label_smoothing: float) -> torch.Tensor:
        mask = batch.tgt_mask
        target = batch.tgt_out[mask]
        if out.logits is not None:  # scheduled sampling computed them already
            return cross_entropy(out.logits[mask], target, label_smoothing)
        # Only real target positions reach the (large) output layer, with their count rounded up
        # so the matmul shapes repeat; the output layer and the loss go in row chunks, with none
        # of nn.CrossEntropyLoss's (N, V) float32 temporaries.
        layer = self.model.output_layer
        return output_cross_entropy(shapes.pad_rows(out.hidden[mask]), layer.weight, layer.bias, target,
                                    label_smoothing)

    def search_weights(self) -> SearchWeights:
        """The per-step weights of a search, prepared once (cast to the autocast dtype, packed on
        the CPU). Make them inside the autocast region the search runs in."""
        return SearchWeights(self.decoder.step_weights(joint=True), SharedWeight(self.model.output_layer.weight))

    def decode_step(self, prev_tokens: torch.Tensor, state: DecoderState, memory: AttentionMemory,
                    weights: SearchWeights) -> StepOutput:
        emb = self.model.decoder.embedding(prev_tokens)  # (B, E)
        h_tilde, state, attention = self.decoder.step(emb, state, memory, weights.decoder)
        # float32 logits with the bias added in float32: fused into the packed product on the CPU
        # (one pass less over the (rows, V) logits), else after it (a bf16 addmm would first
        # copy the bias into every row of its output). Search's row counts are already few
        # (multiples of 8 sentences), so they are padded to SMALL_MULTIPLE only.
        rows, bias = h_tilde.size(0), self.model.output_layer.bias
        h_tilde = shapes.pad_rows(h_tilde, shapes.SMALL_MULTIPLE)
        if weights.output.packed is not None:
            logits = weights.output.packed(h_tilde.to(weights.output.dtype), bias)[:rows].float()
        else:
            logits = weights.output(h_tilde)[:rows].float().add_(bias)
        return StepOutput(logits=logits, state=state, attention=attention)

    @contextlib.contextmanager
    def search_scope(self) -> Iterator[None]:
        """Freed memory stays in the process while a search runs (``kernels.heap``)."""
        with retained_heap():
            yield
