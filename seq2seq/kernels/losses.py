"""Token-level cross-entropy over the output layer's logits, in fixed memory per row chunk.

``nn.CrossEntropyLoss`` on bf16 logits keeps several full (N, V) float32 tensors alive at once
(the float32 copy, the log-softmax it saves, and in backward its gradient and the gradient of the
copy): about 16 bytes per logit. For a batch of long sentences and an 8k vocabulary that is the
largest allocation of a training step. This version saves only the logits themselves and one
log-sum-exp per row, and works through the rows in chunks, so the float32 temporaries are
(chunk, V); its gradient is written straight into one tensor of the logits' dtype. Same loss,
same gradient (label smoothing included), about a quarter of the memory.

The logits may have more rows than there are targets (``seq2seq.kernels.shapes.pad_rows``): the extra
rows are padding, left out of the loss and given a zero gradient.

``output_cross_entropy`` also does the output layer, chunk by chunk: every matmul then has one of
two shapes (so oneDNN's per-shape kernels are built once per run), the bias is added in float32
(no (N, V) broadcast copy of it), and no (N, V) tensor is allocated but the saved logits, which
backward overwrites with their gradient. Same loss and gradients as the output layer followed by
``cross_entropy``.
"""

from __future__ import annotations

import torch

from seq2seq.kernels.steplinear import compute_dtype

# A float32 chunk of 256 x 8k logits is 8 MB: small enough for malloc to reuse freed heap memory
# (chunks over 32 MB are always fresh mmaps, and touching fresh pages cost more than the math here).
CHUNK_ROWS = 256


def _chunk_loss(x: torch.Tensor, target: torch.Tensor, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits (R, V) -> per-row log-sum-exp (R,) and the chunk's summed loss (float64)."""
    lse = torch.logsumexp(x, dim=-1)
    nll = lse - x.gather(1, target.unsqueeze(1)).squeeze(1)
    if smoothing:
        # label smoothing: (1 - e) * nll + e * mean over the vocabulary of -log p
        nll = (1.0 - smoothing) * nll + smoothing * (lse - x.mean(dim=-1))
    return lse, nll.sum(dtype=torch.float64)


def _chunk_grad(x: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, smoothing: float,
                scale: torch.Tensor) -> torch.Tensor:
    """d loss / d logits for float32 logits ``x`` (R, V), computed in x's buffer."""
    p = x.sub_(lse.unsqueeze(1)).exp_()  # softmax
    if smoothing:
        p.sub_(smoothing / x.size(1))
    p.scatter_add_(1, target.unsqueeze(1),
                   torch.full((p.size(0), 1), -(1.0 - smoothing), dtype=p.dtype, device=p.device))
    return p.mul_(scale)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
        n = target.numel()  # rows past n are padding
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for start in range(0, n, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, n)
            lse[start:stop], chunk_total = _chunk_loss(logits[start:stop].float(), target[start:stop], smoothing)
            total += chunk_total
        ctx.save_for_backward(logits, target, lse)
        ctx.smoothing = smoothing
        return (total / max(n, 1)).float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, target, lse = ctx.saved_tensors
        n = target.numel()
        scale = grad.float() / max(n, 1)
        out = torch.empty_like(logits)
        out[n:] = 0  # padding rows
        for start in range(0, n, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, n)
            x = logits[start:stop].to(torch.float32, copy=True)  # never modify the saved logits
            out[start:stop] = _chunk_grad(x, lse[start:stop], target[start:stop], ctx.smoothing, scale)
        return out, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean token cross-entropy of (M, V) ``logits`` against (N,) ``target``, M >= N: the first N
    rows are the real positions, the rest padding from ``pad_rows``."""
    if logits.size(0) < target.numel():
        raise ValueError(f"{logits.size(0)} rows of logits for {target.numel()} targets")
    return _CrossEntropy.apply(logits, target, float(label_smoothing))


class _OutputCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                smoothing: float, dtype: torch.dtype) -> torch.Tensor:
        n, rows = target.numel(), hidden.size(0)
        w = weight.detach().to(dtype)  # cast once for all chunks
        h = hidden.detach().to(dtype)
        b = bias.detach().float() if bias is not None else None
        logits = torch.empty(rows, w.size(0), dtype=dtype, device=hidden.device)  # saved for backward
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, n, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, rows)  # the last chunk takes the padding rows: whole shapes
            chunk = torch.mm(h[start:stop], w.t(), out=logits[start:stop])
            x = chunk[: n - start].to(torch.float32, copy=True)  # never modify the saved logits
            if b is not None:
                x.add_(b)
            lse[start: start + x.size(0)], chunk_total = _chunk_loss(x, target[start: start + x.size(0)], smoothing)
            total += chunk_total
        ctx.save_for_backward(h, w, logits, target, lse)
        ctx.used = False
        ctx.bias = b
        ctx.smoothing = smoothing
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return (total / max(n, 1)).float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, None, None, None]:
        if ctx.used:
            raise RuntimeError("output_cross_entropy's backward ran twice (retain_graph): it is single-use")
        ctx.used = True
        h, w, logits, target, lse = ctx.saved_tensors
        n, rows = target.numel(), h.size(0)
        scale = grad.float() / max(n, 1)
        # The gradient overwrites the saved logits chunk by chunk (each chunk is read before it is
        # written): no second (N, V) tensor, the largest of a step, at the peak of memory.
        grad_logits = logits
        grad_logits[n:] = 0  # padding rows
        grad_h = torch.empty_like(h)
        grad_b = torch.zeros(w.size(0), dtype=torch.float32, device=h.device) if ctx.bias is not None else None
        for start in range(0, n, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, rows)
            real = min(stop, n) - start
            x = logits[start: start + real].to(torch.float32, copy=True)
            if ctx.bias is not None:
                x.add_(ctx.bias)
            g = _chunk_grad(x, lse[start: start + real], target[start: start + real], ctx.smoothing, scale)
            if grad_b is not None:
                grad_b += g.sum(dim=0)
            grad_logits[start: start + real] = g
            torch.mm(grad_logits[start:stop], w, out=grad_h[start:stop])
        grad_w = grad_logits.t().mm(h)
        hidden_dtype, weight_dtype = ctx.dtypes
        return (grad_h.to(hidden_dtype), grad_w.to(weight_dtype),
                grad_b.to(weight_dtype) if grad_b is not None else None, None, None, None)


def output_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """``cross_entropy(nn.functional.linear(hidden, weight, bias), target)`` with the output layer
    done in row chunks (see the module docstring). ``hidden`` (M, P), M >= N real rows first; the
    matmuls use the autocast dtype when autocast is on."""
    if hidden.size(0) < target.numel():
        raise ValueError(f"{hidden.size(0)} rows of hidden states for {target.numel()} targets")
    dtype = compute_dtype(weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return _OutputCrossEntropy.apply(hidden, weight, bias, target, float(label_smoothing), dtype)
