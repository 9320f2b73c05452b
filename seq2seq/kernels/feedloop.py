"""The input-feeding decoder's teacher-forced loop with a hand-written backward through time.

Luong attention with input feeding (Luong et al. 2015, 3.3) is the one model family whose training
cannot run in parallel over the target: each step's LSTM reads the previous step's attentional
state h~. Through autograd every step records some twenty nodes (gate matmul, cell, scores,
softmax, context, W_c, tanh, casts, the cat of the inputs), and on the CPU that bookkeeping, not
the arithmetic, is a large share of a step's cost at these sizes. This module runs the arithmetic of
``Decoder._step`` as one autograd node for the whole loop, as ``lstm.py`` does for the encoder:

- forward writes each step's inputs straight into the buffers backward needs (no cat, no tape);
- backward walks the steps in reverse with the saved activations, a couple of dozen plain
  operations per step, and forms every weight's gradient at the end as one matmul over all steps
  (layer 0's recurrent weight, W_c), and the attention memory's as one batched matmul (keys,
  values).

It covers one LSTM layer with a multiplicative (``dot``/``general``) score, which is what the
decoder uses it for; the other families either run in parallel or keep the autograd loop.
Non-linearities, the cell state, the softmax and h~ are float32; the matmuls run in ``dtype``
(bf16 under autocast), as in the autograd loop.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from seq2seq.kernels import shapes
from seq2seq.kernels.lstm import activate, activate_backward
from seq2seq.kernels.scores import padding_bias
from seq2seq.kernels.steplinear import StepLinear, compute_dtype


class FeedLoopOutput(NamedTuple):
    feeds: torch.Tensor  # (B, T, P) float32 attentional states h~, one per step
    attention: torch.Tensor  # (B, T, S) float32 attention weights (no gradient flows through them)


class _Buffers(NamedTuple):
    """What forward keeps for backward. The rows of the two matmuls whose weight gradients are
    formed over all steps are step-major and padded (``shapes.padded_size``), so their shapes
    repeat from batch to batch."""

    layer0_in: torch.Tensor  # (rows, P + H) [h~_{t-1} | h_{t-1}] in the matmul dtype
    joined: torch.Tensor  # (rows, H + D) [h_t | c_t] in the matmul dtype
    acts: torch.Tensor  # (T, B, 4H) float32 gate activations
    cells: torch.Tensor  # (T + 1, B, H) float32 cell states, the initial one first
    tanh_c: torch.Tensor  # (T, B, H) float32
    queries: torch.Tensor  # (B, T, H) float32 h, the attention queries
    weights: torch.Tensor  # (B, T, S) float32 attention weights
    feeds: torch.Tensor  # (B, T, P) float32 h~


def _run(gold: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, feed0: torch.Tensor, w0: torch.Tensor,
         keys_t: torch.Tensor, values: torch.Tensor, mask_bias: torch.Tensor, wc: torch.Tensor,
         bias_c: torch.Tensor) -> _Buffers:
    """The forward loop. ``gold`` (T, B, 4H): layer 0's gate pre-activations from the gold words,
    biases included; ``w0`` (4H, P + H): layer 0's weight for [h~ | h]; ``keys_t`` (B, K, S)
    and ``values`` (B, S, D) float32; ``mask_bias`` (B, 1, S) float32, 0 at real tokens and -inf
    at padding; ``wc`` (P, H + D); ``bias_c`` float32. The two weights' products are packed on
    the CPU (``StepLinear``: 264 against 382 us for layer 0's 64 x 1024 x 2048 bf16 product here)."""
    steps, batch, four = gold.shape
    size, feed_size = four // 4, feed0.size(-1)
    dtype = w0.dtype
    rows = shapes.padded_size(steps * batch)
    layer0_in = gold.new_zeros(rows, feed_size + size, dtype=dtype)
    joined = gold.new_zeros(rows, size + values.size(-1), dtype=dtype)
    x = layer0_in[: steps * batch].view(steps, batch, -1)
    j = joined[: steps * batch].view(steps, batch, -1)
    acts = gold.new_empty(steps, batch, four, dtype=torch.float32)
    cells = gold.new_empty(steps + 1, batch, size, dtype=torch.float32)
    tanh_c = torch.empty_like(cells[1:])
    queries = gold.new_empty(batch, steps, size, dtype=torch.float32)
    weights = gold.new_empty(batch, steps, mask_bias.size(-1), dtype=torch.float32)
    feeds = gold.new_empty(batch, steps, feed_size, dtype=torch.float32)
    pre = gold.new_empty(batch, four, dtype=torch.float32)
    layer0, combine = StepLinear(w0), StepLinear(wc)
    cells[0] = c0
    x[0, :, :feed_size] = feed0
    x[0, :, feed_size:] = h0
    for t in range(steps):
        torch.add(gold[t], layer0(x[t]), out=pre)
        h, _, _, _ = activate(pre, cells[t], acts[t], tanh_c[t], cells[t + 1])
        queries[:, t] = h
        j[t, :, :size] = h
        # attention in float32: these per-sentence products are a few hundred multiply-adds each,
        # where a bf16 batched matmul costs several times a float32 one in fixed overhead
        scores = torch.baddbmm(mask_bias, h.unsqueeze(1), keys_t)  # (B, 1, S)
        a = torch.softmax(scores, dim=-1, out=weights[:, t: t + 1])
        j[t, :, size:] = torch.bmm(a, values).squeeze(1)
        # h~ = tanh(W_c [h; c] + b_c), the bias added in float32
        feed = feeds[:, t]
        feed.copy_(combine(j[t], bias_c)).tanh_()
        if t + 1 < steps:
            x[t + 1, :, :feed_size] = feed
            x[t + 1, :, feed_size:] = j[t, :, :size]
    return _Buffers(layer0_in, joined, acts, cells, tanh_c, queries, weights, feeds)


class _FeedLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gold: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, feed0: torch.Tensor,
                w_feed: torch.Tensor, w_hh: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask_bias: torch.Tensor, w_c: torch.Tensor, bias_c: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        w0 = torch.cat([w_feed.detach(), w_hh.detach()], dim=1).to(dtype)  # (4H, P + H), cast once
        wc = w_c.detach().to(dtype)  # (P, H + D)
        k, v = keys.detach().float(), values.detach().float()
        buf = _run(gold.detach(), h0.detach(), c0.detach(), feed0.detach(), w0, k.transpose(1, 2), v,
                   mask_bias, wc, bias_c.detach().float())
        ctx.save_for_backward(w0, wc, k, v, *buf)
        ctx.dtypes = (gold.dtype, h0.dtype, c0.dtype, feed0.dtype, w_feed.dtype, keys.dtype, values.dtype,
                      w_c.dtype, bias_c.dtype)
        ctx.feed_size = feed0.size(-1)
        ctx.mark_non_differentiable(buf.weights)
        return buf.feeds, buf.weights

    @staticmethod
    def backward(ctx, grad_feeds: torch.Tensor | None, _grad_weights: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, ...]:
        w0, wc, k, v, *saved = ctx.saved_tensors
        buf = _Buffers(*saved)
        gold_dtype, h0_dtype, c0_dtype, feed0_dtype, w_dtype, k_dtype, v_dtype, wc_dtype, bc_dtype = ctx.dtypes
        steps, batch, four = buf.acts.shape
        size, feed_size, dtype = four // 4, ctx.feed_size, w0.dtype
        rows = buf.layer0_in.size(0)
        if grad_feeds is None:
            grad_feeds = torch.zeros_like(buf.feeds)
        # Per-step gradients. Those that meet a weight gradient are kept in the matmul dtype,
        # step-major with the forward buffers' padded rows (zero tails).
        gates_rows = buf.acts.new_zeros(rows, four, dtype=dtype)  # layer 0's pre-activations
        pre_c_rows = buf.acts.new_zeros(rows, feed_size, dtype=dtype)  # W_c's pre-activations
        grad_gates = gates_rows[: steps * batch].view(steps, batch, four)
        grad_pre_c = pre_c_rows[: steps * batch].view(steps, batch, feed_size)
        grad_context = buf.acts.new_empty(batch, steps, v.size(-1))  # float32, like the attention
        grad_scores = buf.acts.new_empty(batch, steps, k.size(1))
        d_gates = buf.acts.new_empty(batch, four)  # float32 scratch, one step's
        dc = buf.acts.new_zeros(batch, size)
        d_x = None  # gradient of step t+1's layer-0 input [h~_t | h_t]
        for t in range(steps - 1, -1, -1):
            d_feed = grad_feeds[:, t] if d_x is None else torch.add(grad_feeds[:, t], d_x[:, :feed_size])
            feed = buf.feeds[:, t]
            # through h~ = tanh(pre): d pre = d h~ (1 - h~^2)
            torch.addcmul(d_feed, d_feed * feed, feed, value=-1.0, out=grad_pre_c[t])
            d_joined = (grad_pre_c[t] @ wc).float()  # (B, H + D)
            d_context = grad_context[:, t]
            d_context.copy_(d_joined[:, size:])
            # through context = a . values and the softmax (float32, as in forward)
            a = buf.weights[:, t: t + 1]  # (B, 1, S)
            d_a = torch.bmm(d_context.unsqueeze(1), v.transpose(1, 2))  # (B, 1, S)
            ad = a * d_a
            d_s = torch.addcmul(ad, a, ad.sum(-1, keepdim=True), value=-1.0, out=grad_scores[:, t: t + 1])
            d_h = torch.baddbmm(d_joined[:, :size].unsqueeze(1), d_s, k).squeeze(1)  # through scores = h . keys
            if d_x is not None:
                d_h += d_x[:, feed_size:]
            _, dc = activate_backward(buf.acts[t], buf.cells[t], buf.tanh_c[t], d_h, dc, d_gates)
            grad_gates[t] = d_gates
            d_x = (grad_gates[t] @ w0).float()  # (B, P + H): to h~_{t-1} and h_{t-1}
        # every weight's gradient from all steps at once
        grad_w0 = gates_rows.t().mm(buf.layer0_in).to(w_dtype)
        grad_wc = pre_c_rows.t().mm(buf.joined).to(wc_dtype)
        grad_bias_c = pre_c_rows.sum(0, dtype=torch.float32)
        grad_keys = torch.bmm(grad_scores.transpose(1, 2), buf.queries)  # (B, S, K)
        grad_values = torch.bmm(buf.weights.transpose(1, 2), grad_context)  # (B, S, D)
        return (grad_gates.to(gold_dtype), d_x[:, feed_size:].to(h0_dtype), dc.to(c0_dtype),
                d_x[:, :feed_size].to(feed0_dtype),
                grad_w0[:, :feed_size], grad_w0[:, feed_size:], grad_keys.to(k_dtype), grad_values.to(v_dtype),
                None, grad_wc, grad_bias_c.to(bc_dtype), None)


def feed_loop(gold: torch.Tensor, hidden: torch.Tensor, cell: torch.Tensor, feed: torch.Tensor,
              w_feed: torch.Tensor, w_hh: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              mask: torch.Tensor, w_c: torch.Tensor, bias_c: torch.Tensor) -> FeedLoopOutput:
    """The teacher-forced loop of a one-layer input-feeding decoder with a multiplicative score.

    ``gold`` (T, B, 4H), step-major: layer 0's gate pre-activations from the gold words, biases
    included; ``hidden`` (B, H), ``cell`` (B, H) and ``feed`` (B, P): the initial state;
    ``w_feed`` (4H, P) and ``w_hh`` (4H, H): layer 0's weights for h~_{t-1} and h_{t-1}; ``keys``
    (B, S, H) (already multiplied by W_a for ``general``) and ``values`` (B, S, D), with ``mask``
    (B, S) True at real tokens; ``w_c`` (P, H + D) and ``bias_c`` (P,): h~ = tanh(W_c [h; c] + b_c).
    The matmuls run in the autocast dtype when autocast is on, else in the weights' dtype.
    """
    device = gold.device.type
    dtype = compute_dtype(w_hh)
    with torch.autocast(device, enabled=False):
        feeds, weights = _FeedLoop.apply(gold, hidden, cell.float(), feed, w_feed, w_hh, keys, values,
                                         padding_bias(mask).unsqueeze(1), w_c, bias_c, dtype)
    return FeedLoopOutput(feeds, weights)
