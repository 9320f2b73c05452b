"""The Bahdanau decoder's teacher-forced loop with a hand-written backward through time.

In Bahdanau et al. (2015, A.1.2) each step's context is scored from the *previous* decoder state
and enters the LSTM with the previous word, so training cannot run in parallel over the target.
Through autograd each step records a dozen nodes (query projection, energies, scores, softmax,
context, the cat of the LSTM inputs, the gate matmul, the cell), and on the CPU that bookkeeping,
with the per-step gradient accumulations it implies, is a large share of a step at these sizes.
This module runs the arithmetic of ``Decoder._step`` for this family as one autograd node for the
whole loop, as ``feedloop.py`` does for Luong attention with input feeding:

- forward writes each step's inputs straight into the buffers backward needs (no cat, no tape)
  and keeps the (B, S, A) energies of no step: backward recomputes each from the saved query,
  one add and one tanh, in a scratch buffer reused by every step;
- backward walks the steps in reverse and forms every weight's gradient at the end as one matmul
  over all steps (layer 0's context and recurrent weights, the query projection and its bias),
  the values' as one batched matmul; the keys' gradient is summed in place step by step.

It covers one LSTM layer with additive attention scored from the previous state; h~ = tanh(W_c
[h; c]) does not feed back in this family, so the decoder forms it for all steps at once after
the loop. Non-linearities, the cell state, the energies, the softmax and the context are float32;
the two per-step matmuls run in ``dtype`` (bf16 under autocast), as in the autograd loop.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from seq2seq.kernels import shapes
from seq2seq.kernels.lstm import activate, activate_backward
from seq2seq.kernels.scores import padding_bias
from seq2seq.kernels.steplinear import StepLinear, compute_dtype


class BahdanauLoopOutput(NamedTuple):
    outputs: torch.Tensor  # (B, T, H) float32 LSTM outputs h_t
    contexts: torch.Tensor  # (B, T, D) float32 contexts, step t's scored from h_{t-1}
    attention: torch.Tensor  # (B, T, S) float32 attention weights (no gradient flows through them)


class _Buffers(NamedTuple):
    """What forward keeps for backward. The rows of the matmuls whose weight gradients are formed
    over all steps are step-major and padded (``shapes.padded_size``), so their shapes repeat
    from batch to batch."""

    layer0_in: torch.Tensor  # (rows, D + H) [c_t | h_{t-1}] in the matmul dtype
    queries: torch.Tensor  # (T, B, A) float32 W_q h_{t-1} + b_q
    acts: torch.Tensor  # (T, B, 4H) float32 gate activations
    cells: torch.Tensor  # (T + 1, B, H) float32 cell states, the initial one first
    tanh_c: torch.Tensor  # (T, B, H) float32
    weights: torch.Tensor  # (B, T, S) float32 attention weights
    outputs: torch.Tensor  # (B, T, H) float32 h_t
    contexts: torch.Tensor  # (B, T, D) float32


def _energies(keys: torch.Tensor, query: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """tanh(keys + query) into ``out`` (B, S, A): keys (B, S, A), query (B, A)."""
    return torch.add(keys, query.unsqueeze(1), out=out).tanh_()


def _run(gold: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w0: torch.Tensor, wq: torch.Tensor,
         bias_q: torch.Tensor, keys: torch.Tensor, v: torch.Tensor, values: torch.Tensor,
         mask_bias: torch.Tensor) -> _Buffers:
    """The forward loop. ``gold`` (T, B, 4H): layer 0's gate pre-activations from the gold words,
    biases included; ``w0`` (4H, D + H): layer 0's weight for [context | h]; ``wq`` (A, H) and
    ``bias_q`` (A,) float32: the query projection; ``keys`` (B, S, A), ``v`` (A,) and ``values``
    (B, S, D) float32; ``mask_bias`` (B, S) float32, 0 at real tokens and -inf at padding."""
    steps, batch, four = gold.shape
    size, (_, src_len, att_size), ctx_size = four // 4, keys.shape, values.size(-1)
    dtype = w0.dtype
    rows = shapes.padded_size(steps * batch)
    layer0_in = gold.new_zeros(rows, ctx_size + size, dtype=dtype)
    x = layer0_in[: steps * batch].view(steps, batch, -1)
    queries = gold.new_empty(steps, batch, att_size, dtype=torch.float32)
    acts = gold.new_empty(steps, batch, four, dtype=torch.float32)
    cells = gold.new_empty(steps + 1, batch, size, dtype=torch.float32)
    tanh_c = torch.empty_like(cells[1:])
    weights = gold.new_empty(batch, steps, src_len, dtype=torch.float32)
    outputs = gold.new_empty(batch, steps, size, dtype=torch.float32)
    contexts = gold.new_empty(batch, steps, ctx_size, dtype=torch.float32)
    pre = gold.new_empty(batch, four, dtype=torch.float32)
    energy = torch.empty_like(keys)  # one step's (B, S, A), reused
    flat_energy, flat_mask = energy.view(-1, att_size), mask_bias.reshape(-1)
    layer0, query = StepLinear(w0), StepLinear(wq)
    cells[0] = c0
    h_prev = h0.to(dtype)
    for t in range(steps):
        x[t, :, ctx_size:] = h_prev
        q = queries[t]
        q.copy_(query(h_prev, bias_q))
        # score_j = v . tanh(W_q h_{t-1} + b_q + U h_j), padding at -inf
        _energies(keys, q, energy)
        scores = torch.addmv(flat_mask, flat_energy, v).view(batch, 1, src_len)
        a = torch.softmax(scores, dim=-1, out=weights[:, t: t + 1])
        context = torch.bmm(a, values).squeeze(1)
        contexts[:, t] = context
        x[t, :, :ctx_size] = context
        torch.add(gold[t], layer0(x[t]), out=pre)
        h, _, _, _ = activate(pre, cells[t], acts[t], tanh_c[t], cells[t + 1])
        outputs[:, t] = h
        h_prev = h.to(dtype)
    return _Buffers(layer0_in, queries, acts, cells, tanh_c, weights, outputs, contexts)


class _BahdanauLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gold: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ctx: torch.Tensor,
                w_hh: torch.Tensor, w_q: torch.Tensor, bias_q: torch.Tensor, keys: torch.Tensor, v: torch.Tensor,
                values: torch.Tensor, mask_bias: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w0 = torch.cat([w_ctx.detach(), w_hh.detach()], dim=1).to(dtype)  # (4H, D + H), cast once
        wq = w_q.detach().to(dtype)  # (A, H)
        k, vv, val = keys.detach().float(), v.detach().float(), values.detach().float()
        buf = _run(gold.detach(), h0.detach(), c0.detach(), w0, wq, bias_q.detach().float(), k, vv, val, mask_bias)
        ctx.save_for_backward(w0, wq, k, vv, val, *buf)
        ctx.dtypes = (gold.dtype, h0.dtype, c0.dtype, w_ctx.dtype, w_q.dtype, bias_q.dtype, keys.dtype, v.dtype,
                      values.dtype)
        ctx.mark_non_differentiable(buf.weights)
        return buf.outputs, buf.contexts, buf.weights

    @staticmethod
    def backward(ctx, grad_outputs: torch.Tensor | None, grad_contexts: torch.Tensor | None,
                 _grad_weights: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        w0, wq, k, v, val, *saved = ctx.saved_tensors
        buf = _Buffers(*saved)
        gold_dtype, h0_dtype, c0_dtype, w_dtype, wq_dtype, bq_dtype, k_dtype, v_dtype, val_dtype = ctx.dtypes
        steps, batch, four = buf.acts.shape
        size, ctx_size, dtype = four // 4, val.size(-1), w0.dtype
        rows = buf.layer0_in.size(0)
        # Per-step gradients that meet a weight gradient, in the matmul dtype, step-major with the
        # forward buffers' padded rows (zero tails).
        gates_rows = buf.acts.new_zeros(rows, four, dtype=dtype)  # layer 0's pre-activations
        query_rows = buf.acts.new_zeros(rows, wq.size(0), dtype=dtype)  # the queries
        grad_gates = gates_rows[: steps * batch].view(steps, batch, four)
        grad_queries = query_rows[: steps * batch].view(steps, batch, -1)
        grad_context = buf.acts.new_empty(batch, steps, ctx_size)  # float32, like the attention
        grad_keys = torch.zeros_like(k)
        grad_v = buf.acts.new_zeros(batch, 1, v.numel())  # per sentence, summed at the end
        energy, d_energy = torch.empty_like(k), torch.empty_like(k)  # one step's, reused
        d_gates = buf.acts.new_empty(batch, four)  # float32 scratch, one step's
        dc = buf.acts.new_zeros(batch, size)
        d_h = None  # gradient of h_t from the steps after t
        for t in range(steps - 1, -1, -1):
            if grad_outputs is not None:
                d_h = grad_outputs[:, t] if d_h is None else d_h.add_(grad_outputs[:, t])
            elif d_h is None:
                d_h = buf.acts.new_zeros(batch, size)
            _, dc = activate_backward(buf.acts[t], buf.cells[t], buf.tanh_c[t], d_h, dc, d_gates)
            grad_gates[t] = d_gates
            d_x = (grad_gates[t] @ w0).float()  # (B, D + H): to the context and h_{t-1}
            d_context = grad_context[:, t]
            if grad_contexts is not None:
                torch.add(d_x[:, :ctx_size], grad_contexts[:, t], out=d_context)
            else:
                d_context.copy_(d_x[:, :ctx_size])
            # through context = a . values and the softmax (masked positions have a = 0: no gradient)
            a = buf.weights[:, t: t + 1]  # (B, 1, S)
            d_a = torch.bmm(d_context.unsqueeze(1), val.transpose(1, 2))  # (B, 1, S)
            ad = a * d_a
            d_s = torch.addcmul(ad, a, ad.sum(-1, keepdim=True), value=-1.0)  # (B, 1, S)
            # through score_j = v . tanh(e_j): d v += sum_j d s_j e_j; d e_j = d s_j v (1 - e_j^2)
            _energies(k, buf.queries[t], energy)
            grad_v.baddbmm_(d_s, energy)
            torch.mul(d_s.view(batch, -1, 1), v, out=d_energy)
            d_energy.addcmul_(d_energy, energy.square_(), value=-1.0)
            grad_keys.add_(d_energy)
            grad_queries[t] = d_energy.sum(1)
            d_h = d_x[:, ctx_size:].add_((grad_queries[t] @ wq).float())  # to h_{t-1}
        # every weight's gradient from all steps at once
        grad_w0 = gates_rows.t().mm(buf.layer0_in).to(w_dtype)
        grad_wq = query_rows.t().mm(buf.layer0_in[:, ctx_size:]).to(wq_dtype)
        grad_bq = query_rows.sum(0, dtype=torch.float32)
        grad_values = torch.bmm(buf.weights.transpose(1, 2), grad_context)  # (B, S, D)
        assert d_h is not None  # steps >= 1
        return (grad_gates.to(gold_dtype), d_h.to(h0_dtype), dc.to(c0_dtype),
                grad_w0[:, :ctx_size], grad_w0[:, ctx_size:], grad_wq, grad_bq.to(bq_dtype),
                grad_keys.to(k_dtype), grad_v.sum((0, 1)).to(v_dtype), grad_values.to(val_dtype), None, None)


def bahdanau_loop(gold: torch.Tensor, hidden: torch.Tensor, cell: torch.Tensor, w_ctx: torch.Tensor,
                  w_hh: torch.Tensor, w_q: torch.Tensor, bias_q: torch.Tensor, keys: torch.Tensor, v: torch.Tensor,
                  values: torch.Tensor, mask: torch.Tensor) -> BahdanauLoopOutput:
    """The teacher-forced loop of a one-layer decoder whose additive attention is scored from the
    previous state and read before the LSTM step (Bahdanau et al. 2015).

    ``gold`` (T, B, 4H), step-major: layer 0's gate pre-activations from the gold words, biases
    included; ``hidden`` (B, H) and ``cell`` (B, H): the initial state; ``w_ctx`` (4H, D) and
    ``w_hh`` (4H, H): layer 0's weights for the context and h_{t-1}; ``w_q`` (A, H) and ``bias_q``
    (A,): the query projection; ``keys`` (B, S, A): the projected encoder states U h_j; ``v``
    (A,): the energy vector; ``values`` (B, S, D), with ``mask`` (B, S) True at real tokens. The
    matmuls run in the autocast dtype when autocast is on, else in the weights' dtype.
    """
    device = gold.device.type
    dtype = compute_dtype(w_hh)
    with torch.autocast(device, enabled=False):
        outputs, contexts, weights = _BahdanauLoop.apply(gold, hidden, cell.float(), w_ctx, w_hh, w_q, bias_q, keys,
                                                         v, values, padding_bias(mask), dtype)
    return BahdanauLoopOutput(outputs, contexts, weights)
