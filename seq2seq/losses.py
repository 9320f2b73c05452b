"""Token-level cross-entropy over the output layer's logits, in fixed memory per row chunk.

``nn.CrossEntropyLoss`` on bf16 logits keeps several full (N, V) float32 tensors alive at once
(the float32 copy, the log-softmax it saves, and in backward its gradient and the gradient of the
copy): about 16 bytes per logit. For a batch of long sentences and an 8k vocabulary that is the
largest allocation of a training step. This version saves only the logits themselves and one
log-sum-exp per row, and works through the rows in chunks, so the float32 temporaries are
(chunk, V); its gradient is written straight into one tensor of the logits' dtype. Same loss,
same gradient (label smoothing included), about a quarter of the memory.

The logits may have more rows than there are targets (``seq2seq.shapes.pad_rows``): the extra
rows are padding, left out of the loss and given a zero gradient.
"""

from __future__ import annotations

import torch

# A float32 chunk of 256 x 8k logits is 8 MB: small enough for malloc to reuse freed heap memory
# (chunks over 32 MB are always fresh mmaps, and touching fresh pages cost more than the math here).
CHUNK_ROWS = 256


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
        n = target.numel()  # rows past n are padding
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for start in range(0, n, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, n)
            x = logits[start:stop].float()
            t = target[start:stop]
            chunk_lse = torch.logsumexp(x, dim=-1)
            lse[start:stop] = chunk_lse
            nll = chunk_lse - x.gather(1, t.unsqueeze(1)).squeeze(1)
            if smoothing:
                # label smoothing: (1 - e) * nll + e * mean over the vocabulary of -log p
                nll = (1.0 - smoothing) * nll + smoothing * (chunk_lse - x.mean(dim=-1))
            total += nll.sum(dtype=torch.float64)
        ctx.save_for_backward(logits, target, lse)
        ctx.smoothing = smoothing
        return (total / max(n, 1)).float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, target, lse = ctx.saved_tensors
        n, v = target.numel(), logits.size(1)
        e = ctx.smoothing
        scale = grad.float() / max(n, 1)
        out = torch.empty_like(logits)
        out[n:] = 0  # padding rows
        for start in range(0, n, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, n)
            x = logits[start:stop].to(torch.float32, copy=True)  # never modify the saved logits
            p = x.sub_(lse[start:stop].unsqueeze(1)).exp_()  # softmax, in x's buffer
            if e:
                p.sub_(e / v)
            p.scatter_add_(1, target[start:stop].unsqueeze(1),
                           torch.full((p.size(0), 1), -(1.0 - e), dtype=p.dtype, device=p.device))
            out[start:stop] = p.mul_(scale)
        return out, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean token cross-entropy of (M, V) ``logits`` against (N,) ``target``, M >= N: the first N
    rows are the real positions, the rest padding from ``pad_rows``."""
    if logits.size(0) < target.numel():
        raise ValueError(f"{logits.size(0)} rows of logits for {target.numel()} targets")
    return _CrossEntropy.apply(logits, target, float(label_smoothing))
