"""A weight used at every step of a recurrence, with its gradient computed in one matmul.

Plain autograd computes a weight's gradient separately at each step (T small matmuls) and adds
each into an accumulator (T passes over the whole weight), and under bf16 autocast it also casts
the weight at each step. ``SharedWeight`` casts the weight once per pass, keeps each step's input
and output gradient, and forms the weight gradient once, as one (out x T*B) @ (T*B x in) matmul,
with a single rounding. The arithmetic is the same; the work is a few large operations instead of
many small ones.

Outside autograd (evaluation, search) it is a plain matmul in the autocast dtype, on the CPU with
the weight packed once into oneDNN's blocked layout (see ``pack_linear``).
"""

from __future__ import annotations

import functools
import logging

import torch

from seq2seq.kernels.compat import mkldnn_packing
from seq2seq.kernels.shapes import pad_batched, pad_rows


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a matmul with ``weight`` runs in: autocast's when it is on, else the weight's."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


_REORDER, _PACKED_LINEAR = mkldnn_packing()
log = logging.getLogger(__name__)


class PackedLinear:
    """``x @ weight.T`` for a fixed 2-D CPU weight, the weight reordered once into oneDNN's blocked
    layout. A plain CPU matmul reorders its weight operand on every call: for the search step's
    few-row products that pass over the weight costs as much as the arithmetic (64 x 512 x 8000
    in bf16: 556 us plain, 269 us packed; 64 x 1280 x 2048: 314 against 209 us, on this
    project's machines). Worth it where one weight meets many small matmuls, as in search."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features = weight.size(0)
        self.weight = _REORDER(weight.detach().contiguous())

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T``, plus ``bias`` (float32 allowed: added to the float32 accumulator
        before the one rounding to the output's dtype) when given."""
        return _PACKED_LINEAR(x, self.weight, None if bias is None else bias.detach(), "none", [], "")


class StepLinear:
    """``x @ weight.T`` (+ ``bias``) for a fixed weight (out, in) that many small products of one
    loop share: packed where ``PackedLinear`` can take it (bias as there), a plain matmul elsewhere
    (CUDA, a torch without oneDNN). The output is in the input's dtype, or promoted by the bias
    in the plain case."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.packed = PackedLinear(weight) if can_pack(weight) else None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is not None:
            return self.packed(x, bias)
        out = x @ self.weight.mT
        return out if bias is None else out + bias


def can_pack(weight: torch.Tensor) -> bool:
    """Whether ``PackedLinear`` can take ``weight``: 2-D, on the CPU, float32 or bf16 (bf16 only
    where this CPU's oneDNN has a bf16 path), no autograd through it, and a torch built with oneDNN."""
    return (_REORDER is not None and _PACKED_LINEAR is not None and torch.backends.mkldnn.is_available()
            and weight.dim() == 2 and weight.device.type == "cpu" and not weight.requires_grad
            and (weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and packs_bf16())))


@functools.cache
def packs_bf16() -> bool:
    """Whether oneDNN packs bf16 weights on this CPU. It needs AVX512 (BW, VL, DQ) or AVX-NE-CONVERT
    and raises otherwise (an AMD EPYC without AVX512 does): found by trying once, since torch has
    no probe for exactly that. Without it, bf16 products in search run as plain matmuls."""
    try:
        _REORDER(torch.zeros(16, 16, dtype=torch.bfloat16))  # type: ignore[misc]
    except RuntimeError as err:
        log.info("oneDNN cannot pack bf16 weights on this CPU (%s): plain bf16 matmuls in search",
                 str(err).splitlines()[0])
        return False
    return True


class _Tape:
    """Each step's input and output gradient. Holds only detached tensors, so no reference cycle
    runs through the autograd graph (a cycle through a Function's ctx would leak every step's
    activations)."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []
        self.grads: dict[int, torch.Tensor] = {}
        self.signalled = False


def _cast_joined(pieces: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """The pieces side by side (along the input axis, the last) in ``dtype``: one pass over each."""
    if len(pieces) == 1:
        return pieces[0].detach().to(dtype, copy=True)
    first = pieces[0]
    joined = first.new_empty((*first.shape[:-1], sum(p.size(-1) for p in pieces)), dtype=dtype)
    start = 0
    for piece in pieces:
        joined[..., start : start + piece.size(-1)].copy_(piece.detach())
        start += piece.size(-1)
    return joined


class SharedWeight:
    """A weight (out, in) applied as ``x @ weight.T`` at many steps of one forward pass. Several
    pieces (out, in_i) act as one weight, side by side along the input axis (``x`` is then the
    matching concatenation of inputs): one matmul per step where there would be one per piece.

    The weight may also be batched, (B, out, in) with ``x`` (B, n, in): the attention memory, which
    every decoder step reads (keys in a score, values in a context) and whose gradient would
    otherwise be formed and summed step by step, a (B, S, D) pass per step each time."""

    def __init__(self, *pieces: torch.Tensor) -> None:
        self.dtype = compute_dtype(pieces[0])
        self.tracked = torch.is_grad_enabled() and any(p.requires_grad for p in pieces)
        self.packed: PackedLinear | None = None
        if self.tracked:
            self.tape = _Tape()
            self.step_weight = _CastOnce.apply(self.tape, self.dtype, *pieces)
        else:
            self.step_weight = _cast_joined(pieces, self.dtype)
            self.linear = StepLinear(self.step_weight)
            self.packed = self.linear.packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tracked:
            return self.linear(x.to(self.dtype))
        return _StepMatmul.apply(x, self.step_weight, self.tape)


class _CastOnce(torch.autograd.Function):
    """The weight in the compute dtype; its backward runs after every step's and forms the
    gradient from all of them at once."""

    @staticmethod
    def forward(ctx, tape: _Tape, dtype: torch.dtype, *pieces: torch.Tensor) -> torch.Tensor:
        ctx.tape = tape
        ctx.weight_dtype = pieces[0].dtype
        ctx.widths = [p.size(-1) for p in pieces]
        return _cast_joined(pieces, dtype)

    @staticmethod
    def backward(ctx, _placeholder: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        tape = ctx.tape
        steps = sorted(tape.grads)
        if not steps:
            return (None, None, *[None] * len(ctx.widths))
        inputs, grads = [tape.inputs[i] for i in steps], [tape.grads[i] for i in steps]
        tape.inputs.clear()
        tape.grads.clear()
        if inputs[0].dim() == 2:
            # (T*B, in) and (T*B, out), rows padded with zeros so the shapes repeat (seq2seq/kernels/shapes.py)
            grad = pad_rows(torch.cat(grads)).t().mm(pad_rows(torch.cat(inputs)))
        else:  # batched: (B, T*n, out)^T @ (B, T*n, in), all three sizes padded (as above)
            out, inp = grads[0].size(-1), inputs[0].size(-1)
            grad = pad_batched(torch.cat(grads, dim=1)).mT.bmm(pad_batched(torch.cat(inputs, dim=1)))
            grad = grad[:, :out, :inp]
        return (None, None, *grad.to(ctx.weight_dtype).split(ctx.widths, dim=-1))


class _StepMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, tape: _Tape) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.detach().to(weight.dtype)
            ctx.index = len(tape.inputs)
            tape.inputs.append(x)
            ctx.tape = tape
            ctx.save_for_backward(weight)
            return x @ weight.mT

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        (weight,) = ctx.saved_tensors
        tape = ctx.tape
        grad = grad.to(weight.dtype)
        tape.grads[ctx.index] = grad
        placeholder = None
        if not tape.signalled:
            # One non-None gradient makes autograd run _CastOnce.backward once all steps are done;
            # an expanded scalar costs no memory, and the others send None, so nothing is summed.
            tape.signalled = True
            placeholder = weight.new_zeros(()).expand_as(weight)
        return grad @ weight, placeholder, None
