"""One bidirectional LSTM layer with a hand-written backward through time, for the CPU.

On the CPU, ``nn.LSTM`` runs through oneDNN, which compiles and caches a new kernel for every
(length, batch) shape it meets: a cold first update per new source length, and a cache that grew
training's resident memory by about 1.7 GB over a few hundred updates. This layer does the same
arithmetic with ordinary tensor operations whose shapes do not depend on the length:

- the input part of the gates of every step, both directions, in one matmul before the loop,
  kept (S, B, 8H) in the compute dtype: each step reads its rows in place, so no reversed or
  float32 copy of it is made (fresh multi-MB buffers cost more in page faults than their math);
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

from seq2seq.kernels import shapes
from seq2seq.kernels.steplinear import compute_dtype


def activate(pre: torch.Tensor, c: torch.Tensor, acts: torch.Tensor | None = None,
              tanh_c: torch.Tensor | None = None, c_out: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A cell (gate order i, f, g, o) from float32 pre-activations (..., 4H) and the cell state:
    (h, c', activations, tanh(c')); ``acts``, ``tanh_c`` and ``c_out`` receive those when given."""
    size = c.size(-1)
    a = torch.sigmoid(pre, out=acts) if acts is not None else torch.sigmoid(pre)
    torch.tanh(pre[..., 2 * size: 3 * size], out=a[..., 2 * size: 3 * size])
    i, f, g, o = a.chunk(4, dim=-1)
    c_new = torch.addcmul(f * c, i, g, out=c_out) if c_out is not None else torch.addcmul(f * c, i, g)
    tc = torch.tanh(c_new, out=tanh_c) if tanh_c is not None else torch.tanh(c_new)
    return o * tc, c_new, a, tc


def activate_backward(a: torch.Tensor, c: torch.Tensor, tc: torch.Tensor, dh: torch.Tensor,
                       dc: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of ``activate`` given d h and d c': the pre-activations' gradient, written into
    ``out`` (..., 4H), and the previous cell state's."""
    size = c.size(-1)
    i, f, g, o = a.chunk(4, dim=-1)
    di, df, dg, do = out.chunk(4, dim=-1)
    dc = torch.addcmul(dc, dh * o, 1.0 - tc * tc)
    torch.mul(dh, tc, out=do)
    torch.mul(dc, g, out=di)
    torch.mul(dc, c, out=df)
    torch.mul(dc, i, out=dg)
    # through the non-linearities: sigmoid' = a (1 - a) for i, f, o; tanh' = 1 - g^2 for g
    deriv = torch.addcmul(a, a, a, value=-1.0)
    torch.addcmul(torch.ones_like(g), g, g, value=-1.0, out=deriv[..., 2 * size: 3 * size])
    return out.mul_(deriv), dc * f


def _run(gates_in: torch.Tensor, w_hh_t: torch.Tensor, valid: torch.Tensor, save: bool
         ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """The recurrence. ``gates_in`` (S, B, 8H): the input part of the gates at each source
    position, forward direction's first; ``w_hh_t`` (2, H, 4H); ``valid`` (S, 2, B, 1) float per
    step (the backward direction's step t is position S-1-t): 1 where the step updates the state,
    0 where it passes through. Returns float32 outputs (B, S, 2H) (zero where not valid), the
    last states (2, B, H) and, with ``save``, what backward needs."""
    steps, batch, eight = gates_in.shape
    four, size = eight // 2, eight // 8
    h = gates_in.new_zeros(2, batch, size, dtype=torch.float32)
    c = torch.zeros_like(h)
    pre = gates_in.new_empty(2, batch, four, dtype=torch.float32)
    out = gates_in.new_empty(batch, steps, 2 * size, dtype=torch.float32)
    saved = None
    if save:
        acts = gates_in.new_empty(steps, 2, batch, four, dtype=torch.float32)
        cells = gates_in.new_empty(steps + 1, 2, batch, size, dtype=torch.float32)  # c after each step
        tanh_c = torch.empty_like(cells[1:])
        cells[0] = 0
        # h before each step, by source position, with the S*B rows padded (see backward)
        h_rows = gates_in.new_empty(2, shapes.padded_size(steps * batch), size, dtype=w_hh_t.dtype)
        h_rows[:, steps * batch:] = 0
        h_pos = h_rows[:, : steps * batch].view(2, steps, batch, size)
        saved = (acts, cells, tanh_c, h_rows)
    for t in range(steps):
        back = steps - 1 - t
        hm = h.to(w_hh_t.dtype)
        if save:
            h_pos[0, t] = hm[0]
            h_pos[1, back] = hm[1]
        rec = torch.bmm(hm, w_hh_t).float()  # (2, B, 4H); the sums below in float32
        torch.add(gates_in[t, :, :four], rec[0], out=pre[0])
        torch.add(gates_in[back, :, four:], rec[1], out=pre[1])
        h_new, c_new, _, _ = activate(pre, c, acts[t] if save else None, tanh_c[t] if save else None)
        v = valid[t]
        # lerp with weight 0 or 1 returns exactly one end (and costs a fraction of torch.where)
        c = torch.lerp(c, c_new, v, out=cells[t + 1]) if save else torch.lerp(c, c_new, v)
        h = torch.lerp(h, h_new, v)
        torch.mul(h_new[0], v[0], out=out[:, t, :size])
        torch.mul(h_new[1], v[1], out=out[:, back, size:])
    return out, h, saved


class _Recurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates_in: torch.Tensor, w_hh: torch.Tensor, valid: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        w = w_hh.detach().to(dtype)  # (2, 4H, H), cast once for all steps
        out, h_last, saved = _run(gates_in.detach(), w.transpose(1, 2), valid, save=True)
        ctx.save_for_backward(w, valid, *saved)
        ctx.dtypes = (gates_in.dtype, w_hh.dtype)
        return out, h_last

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_h_last: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        w, valid, acts, cells, tanh_c, h_rows = ctx.saved_tensors
        steps, _, batch, four = acts.shape
        size = four // 4
        keep = valid  # 1 where the step updates the state
        hold = 1.0 - keep  # 1 where the state passes through unchanged
        # Gate gradients by source position, (rows, 8H) with the S*B rows padded like h_rows, so
        # each direction's weight gradient below is one matmul with no transposing copy.
        grad_rows = acts.new_empty(h_rows.size(1), 2 * four)
        grad_rows[steps * batch:] = 0
        grad_gates = grad_rows[: steps * batch].view(steps, batch, 2 * four)
        dh = grad_h_last.float() if grad_h_last is not None else acts.new_zeros(2, batch, size)
        dc = acts.new_zeros(2, batch, size)
        d = acts.new_empty(2, batch, four)
        for t in range(steps - 1, -1, -1):
            back = steps - 1 - t
            k, p = keep[t], hold[t]
            # the output's gradient reaches h only where the step was real (out = h_new * valid)
            step_grad = dh if grad_out is None else dh + torch.stack([grad_out[:, t, :size], grad_out[:, back, size:]])
            _, dc_prev = activate_backward(acts[t], cells[t], tanh_c[t], step_grad * k, dc * k, d)
            grad_gates[t, :, :four] = d[0]
            grad_gates[back, :, four:] = d[1]
            dh = torch.addcmul(torch.bmm(d.to(w.dtype), w).float(), dh, p)
            dc = torch.addcmul(dc_prev, dc, p)
        # Each direction's recurrent weight gradient from all steps at once: (4H, rows) @ (rows, H).
        g16 = grad_rows.to(w.dtype)
        grad_w = torch.stack([g16[:, :four].t().mm(h_rows[0]), g16[:, four:].t().mm(h_rows[1])])
        gates_dtype, weight_dtype = ctx.dtypes
        return grad_gates.to(gates_dtype), grad_w.to(weight_dtype), None, None


def bidirectional_layer(x: torch.Tensor, mask: torch.Tensor, w_ih: torch.Tensor, bias: torch.Tensor,
                        w_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer over (B, S, I) inputs with (B, S) ``mask`` (True at real tokens).

    ``w_ih`` (8H, I): both directions' input weights stacked, forward first; ``bias`` (8H,) both
    biases of both directions; ``w_hh`` (2, 4H, H). Returns outputs (B, S, 2H) (zero at padding)
    and the final states (2, B, H): forward at each sentence's last token, backward at its first.
    """
    gates_in = shapes.linear(x.transpose(0, 1), w_ih, bias)  # (S, B, 8H), all steps at once
    # per step, both directions: the backward direction's step t reads position S-1-t
    valid = torch.stack([mask.t(), mask.t().flip(0)], dim=1).unsqueeze(-1).float()  # (S, 2, B, 1)
    dtype = compute_dtype(w_hh)
    with torch.autocast(x.device.type, enabled=False):
        if torch.is_grad_enabled() and (gates_in.requires_grad or w_hh.requires_grad):
            out, h_last = _Recurrence.apply(gates_in, w_hh, valid, dtype)
        else:
            out, h_last, _ = _run(gates_in, w_hh.to(dtype).transpose(1, 2), valid, save=False)
    # in the compute dtype, as nn.LSTM gives under autocast, so attention does not cast the
    # values at every decoder step
    return out.to(dtype), h_last


class _Cell(torch.autograd.Function):
    """One LSTM cell from its gate pre-activations: a single autograd node instead of the eight
    of the element-wise formula (per-node overhead is most of a decoder step's cost on the CPU)."""

    @staticmethod
    def forward(ctx, gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, c_new, a, tc = activate(gates.float(), c)
        ctx.save_for_backward(a, c, tc)
        ctx.gates_dtype = gates.dtype
        return h, c_new

    @staticmethod
    def backward(ctx, dh: torch.Tensor | None, dc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        a, c, tc = ctx.saved_tensors
        dh = torch.zeros_like(c) if dh is None else dh.float()
        dc = torch.zeros_like(c) if dc is None else dc.float()
        d, dc_prev = activate_backward(a, c, tc, dh, dc, torch.empty_like(a))
        return d.to(ctx.gates_dtype), dc_prev


def lstm_cell(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, c') of an LSTM cell (gate order i, f, g, o) from pre-activations ``gates`` (B, 4H),
    float32 non-linearities and cell state."""
    if torch.is_grad_enabled() and (gates.requires_grad or c.requires_grad):
        return _Cell.apply(gates, c.float())
    h, c_new, _, _ = activate(gates.float(), c.float())
    return h, c_new
