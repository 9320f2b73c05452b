"""One bidirectional LSTM layer with a hand-written backward through time, for the CPU.

On the CPU, ``nn.LSTM`` runs through oneDNN, which compiles and caches a new kernel for every
(length, batch) shape it meets: a cold first update per new source length, and a cache that grew
training's resident memory by about 1.7 GB over a few hundred updates. This layer does the same
arithmetic with ordinary tensor operations whose shapes do not depend on the length:

- the input part of the gates of every step, both directions, in one matmul before the loop;
- per step, one batched matmul for both directions' recurrent part and a few element-wise ops;
- backward walks the steps in reverse with the gate activations saved by forward, and forms the
  recurrent weight's gradient at the end as one matmul over all steps.

It uses ``nn.LSTM``'s own parameters (gate order i, f, g, o; both biases), so checkpoints are the
same either way; on CUDA the encoder keeps cuDNN. Padding is handled with a per-step mask: the
forward direction's state stops changing after a sentence's last token, and the backward
direction's stays zero until its first, so no sentence's states depend on the rest of the batch.
Non-linearities and the cell state are float32; under autocast the matmuls use its dtype.
"""

from __future__ import annotations

import torch

from seq2seq import shapes


def _compute_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _run(gates_in: torch.Tensor, w_hh_t: torch.Tensor, valid: torch.Tensor, save: bool
         ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """The recurrence. ``gates_in`` (S, 2, B, 4H) float32 input part of the gates, step-major, the
    backward direction already reversed in time; ``w_hh_t`` (2, H, 4H); ``valid`` (S, 2, B, 1) float,
    1 where the step updates the state, 0 where it passes through.
    Returns outputs (S, 2, B, H) (zero where not valid), the last states (2, B, H) and, with
    ``save``, what backward needs."""
    steps, _, batch, four = gates_in.shape
    size = four // 4
    h = gates_in.new_zeros(2, batch, size)
    c = gates_in.new_zeros(2, batch, size)
    out = gates_in.new_empty(steps, 2, batch, size)
    acts = gates_in.new_empty(steps, 2, batch, four) if save else None
    cells = gates_in.new_empty(steps + 1, 2, batch, size) if save else None  # c after each step (masked)
    tanh_c = gates_in.new_empty(steps, 2, batch, size) if save else None
    # h before each step, direction-major with the (step, batch) rows padded (see backward)
    h_rows = gates_in.new_empty(2, shapes.padded_size(steps * batch), size, dtype=w_hh_t.dtype) if save else None
    if save:
        cells[0] = 0
        h_rows[:, steps * batch:] = 0
        h_prev = h_rows[:, : steps * batch].view(2, steps, batch, size)
    for t in range(steps):
        hm = h.to(w_hh_t.dtype)
        if save:
            h_prev[:, t] = hm
        pre = gates_in[t] + torch.bmm(hm, w_hh_t)  # (2, B, 4H), float32
        a = torch.sigmoid(pre, out=acts[t]) if save else torch.sigmoid(pre)
        torch.tanh(pre[..., 2 * size: 3 * size], out=a[..., 2 * size: 3 * size])
        i, f, g, o = a.chunk(4, dim=-1)
        c_new = torch.addcmul(f * c, i, g)
        tc = torch.tanh(c_new, out=tanh_c[t]) if save else torch.tanh(c_new)
        h_new = o * tc
        v = valid[t]
        # lerp with weight 0 or 1 returns exactly one end (and costs a fraction of torch.where)
        c = torch.lerp(c, c_new, v, out=cells[t + 1]) if save else torch.lerp(c, c_new, v)
        h = torch.lerp(h, h_new, v)
        torch.mul(h_new, v, out=out[t])
    saved = (acts, cells, tanh_c, h_rows) if save else None
    return out, h, saved


class _Recurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates_in: torch.Tensor, w_hh: torch.Tensor, valid: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        w = w_hh.detach().to(dtype)  # (2, 4H, H), cast once for all steps
        out, h_last, saved = _run(gates_in.detach(), w.transpose(1, 2), valid, save=True)
        ctx.save_for_backward(w, valid, *saved)
        ctx.weight_dtype = w_hh.dtype
        return out, h_last

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, grad_h_last: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        w, valid, acts, cells, tanh_c, h_rows = ctx.saved_tensors
        steps, _, batch, four = acts.shape
        size = four // 4
        keep = valid  # 1 where the step updates the state
        hold = 1.0 - keep  # 1 where the state passes through unchanged
        # Gate gradients direction-major, (2, rows, 4H) with the S*B rows padded like h_rows, so
        # the weight gradient below is one bmm with no transposing copy.
        grad_rows = acts.new_empty(2, h_rows.size(1), four)
        grad_rows[:, steps * batch:] = 0
        grad_pre = grad_rows[:, : steps * batch].view(2, steps, batch, four)
        dh = grad_h_last.float() if grad_h_last is not None else acts.new_zeros(2, batch, size)
        dc = acts.new_zeros(2, batch, size)
        if grad_out is None:
            grad_out = acts.new_zeros(steps, 2, batch, size)
        for t in range(steps - 1, -1, -1):
            k, p = keep[t], hold[t]
            a = acts[t]
            i, f, g, o = a.chunk(4, dim=-1)
            dh_new = (dh + grad_out[t]) * k
            tc = tanh_c[t]
            dc_new = torch.addcmul(dc * k, dh_new * o, 1.0 - tc * tc)
            d = grad_pre[:, t]
            di, df, dg, do = d.chunk(4, dim=-1)
            torch.mul(dc_new, g, out=di)
            torch.mul(dc_new, cells[t], out=df)
            torch.mul(dc_new, i, out=dg)
            torch.mul(dh_new, tc, out=do)
            # through the non-linearities: sigmoid' = a (1 - a) for i, f, o; tanh' = 1 - g^2 for g
            deriv = torch.addcmul(a, a, a, value=-1.0)
            torch.addcmul(torch.ones_like(g), g, g, value=-1.0, out=deriv[..., 2 * size: 3 * size])
            d.mul_(deriv)
            dh = torch.addcmul(torch.bmm(d.to(w.dtype), w).float(), dh, p)
            dc = torch.addcmul(dc_new * f, dc, p)
        # The recurrent weight's gradient from all steps at once: (2, 4H, rows) @ (2, rows, H).
        grad_w = torch.bmm(grad_rows.to(w.dtype).transpose(1, 2), h_rows).to(ctx.weight_dtype)
        return grad_pre.transpose(0, 1), grad_w, None, None


def bidirectional_layer(x: torch.Tensor, mask: torch.Tensor, w_ih: torch.Tensor, bias: torch.Tensor,
                        w_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer over (B, S, I) inputs with (B, S) ``mask`` (True at real tokens).

    ``w_ih`` (8H, I): both directions' input weights stacked, forward first; ``bias`` (8H,) both
    biases of both directions; ``w_hh`` (2, 4H, H). Returns outputs (B, S, 2H) (zero at padding)
    and the final states (2, B, H): forward at each sentence's last token, backward at its first.
    """
    batch, steps = mask.shape
    four = w_hh.size(1)
    gates = shapes.linear(x, w_ih, bias).float()  # (B, S, 8H), all steps at once
    gates = gates.view(batch, steps, 2, four).permute(1, 2, 0, 3)  # (S, 2, B, 4H)
    gates_in = torch.stack([gates[:, 0], gates[:, 1].flip(0)], dim=1)  # backward direction reversed
    valid = torch.stack([mask.t(), mask.t().flip(0)], dim=1).unsqueeze(-1).float()  # (S, 2, B, 1)
    dtype = _compute_dtype(x.device) or w_hh.dtype
    with torch.autocast(x.device.type, enabled=False):
        if torch.is_grad_enabled() and (gates_in.requires_grad or w_hh.requires_grad):
            out, h_last = _Recurrence.apply(gates_in, w_hh, valid, dtype)
        else:
            out, h_last, _ = _run(gates_in, w_hh.to(dtype).transpose(1, 2), valid, save=False)
    # back to (B, S, 2H), the backward direction in source order; in the compute dtype, as
    # nn.LSTM gives under autocast, so attention does not cast the values at every decoder step
    outputs = torch.cat([out[:, 0], out[:, 1].flip(0)], dim=-1).transpose(0, 1).to(dtype).contiguous()
    return outputs, h_last
