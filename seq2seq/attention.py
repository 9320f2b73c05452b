"""Attention modules: one stateless interface for "no attention", Bahdanau and Luong.

``prepare`` turns the encoder output into an ``AttentionMemory`` once per batch (this is where key
projections are computed); ``forward`` scores any number of queries against it. Nothing is stored
on the module between calls, so the same module serves training, greedy and beam search.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from seq2seq import shapes
from seq2seq.encoder import EncoderOutput
from seq2seq.steplinear import SharedWeight


class AttentionMemory(NamedTuple):
    keys: torch.Tensor  # (B, S, K) projected keys, computed once per batch
    values: torch.Tensor  # (B, S, D) encoder states that contexts are averaged from
    mask: torch.Tensor  # (B, S) True at real tokens
    # For a step-by-step pass (``for_steps``): the two matmuls with keys and values as shared
    # weights, so that their gradients are formed once for all steps.
    key_matmul: SharedWeight | None = None
    value_matmul: SharedWeight | None = None

    def select(self, index: torch.Tensor) -> AttentionMemory:
        """Rows ``index`` of the batch (beam search compacts with this)."""
        return AttentionMemory(*(t.index_select(0, index) for t in (self.keys, self.values, self.mask)))

    def for_steps(self, scored_keys: bool) -> AttentionMemory:
        """This memory for a pass that attends one step at a time with gradients: values (and the
        keys, when ``scored_keys``: scores are query . key products) through ``SharedWeight``."""
        if not torch.is_grad_enabled():
            return self
        return self._replace(key_matmul=SharedWeight(self.keys) if scored_keys else None,
                             value_matmul=SharedWeight(self.values.transpose(1, 2)))

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """query . key for (B, T, K) queries: (B, T, S)."""
        if self.key_matmul is not None:
            return self.key_matmul(query)
        return torch.bmm(query, self.keys.transpose(1, 2))

    def read(self, weights: torch.Tensor) -> torch.Tensor:
        """Contexts (B, T, D) from attention weights (B, T, S)."""
        if self.value_matmul is not None:
            return self.value_matmul(weights)
        return torch.bmm(weights, self.values)


class AttentionResult(NamedTuple):
    context: torch.Tensor  # (B, T, D)
    weights: torch.Tensor | None  # (B, T, S), rows sum to 1, exactly 0 at padding; None: no attention


def padding_bias(mask: torch.Tensor) -> torch.Tensor:
    """(B, S) float32, 0 at real tokens and -inf at padding: added to scores, it gives padding
    exactly zero weight in the softmax (the one-node loops' form of ``masked_softmax``'s mask)."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis of (B, T, S) scores with padded positions at exactly zero,
    computed and returned in float32 (the matmul that reads them casts them as it needs; every
    op less counts in the step loop)."""
    return torch.softmax(scores.masked_fill(~mask.unsqueeze(1), float("-inf")), dim=-1, dtype=torch.float32)


class Attention(nn.Module):
    """Base class. ``query_free`` attention ignores the query (so the decoder may run in parallel)."""

    query_free = False

    def __init__(self, query_size: int, value_size: int) -> None:
        super().__init__()
        self.query_size = query_size
        self.value_size = value_size

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        raise NotImplementedError

    def forward(self, query: torch.Tensor, memory: AttentionMemory) -> AttentionResult:
        raise NotImplementedError


class NoAttention(Attention):
    """The fixed-vector encoder-decoder (Cho et al. 2014; RNNencdec in Bahdanau et al. 2015):
    every step gets the same context, the encoder's summary, and nothing else of the source."""

    query_free = True

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        summary = enc.summary.unsqueeze(1)  # (B, 1, D)
        mask = torch.ones(summary.shape[:2], dtype=torch.bool, device=summary.device)
        return AttentionMemory(keys=summary, values=summary, mask=mask)

    def forward(self, query: torch.Tensor, memory: AttentionMemory) -> AttentionResult:
        b, t = query.shape[:2]
        return AttentionResult(context=memory.values.expand(b, t, -1), weights=None)


class AdditiveScores(torch.autograd.Function):
    """scores = tanh(q + k) . v over (B, T, S, A), without keeping tanh(q + k) for backward.

    Autograd would keep the (B, T, S, A) energies of every decoder step until backward, the
    largest activation of a Bahdanau model (hundreds of MB for a batch of long sentences). Here
    backward recomputes them from q and k, one add and one tanh, and frees them at once.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, keys: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, keys, v)
        return torch.add(keys, q).tanh_() @ v

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, keys, v = ctx.saved_tensors
        energies = torch.add(keys, q).tanh_()  # (B, T, S, A)
        grad_v = torch.einsum("bts,btsa->a", grad, energies)
        # d/d(q + k) = grad * v * (1 - tanh^2), built in place in the energies' buffer
        pre = energies.square_().neg_().add_(1).mul_(grad.unsqueeze(-1)).mul_(v)
        return _sum_to(pre, q), _sum_to(pre, keys), grad_v


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a broadcast gradient back to ``like``'s shape (its size-1 axes)."""
    axes = tuple(i for i in range(grad.dim()) if like.size(i) == 1 and grad.size(i) != 1)
    return grad.sum(dim=axes, keepdim=True) if axes else grad


class AdditiveAttention(Attention):
    """score(q, h_j) = v^T tanh(W q + U h_j). Bahdanau et al. 2015, appendix A.1.2 (with the
    previous decoder state as q), and Luong et al. 2015's ``concat`` score (current state)."""

    def __init__(self, query_size: int, value_size: int, hidden_size: int) -> None:
        super().__init__(query_size, value_size)
        self.key_proj = nn.Linear(value_size, hidden_size, bias=False)  # U
        self.query_proj = nn.Linear(query_size, hidden_size, bias=True)  # W (+ bias)
        self.energy = nn.Linear(hidden_size, 1, bias=False)  # v

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        # Keys in float32 (cast once per batch): the per-step tanh over (B, S, A) is the costliest
        # element-wise work of a step, and on CPU it is several times slower in bf16.
        keys = shapes.linear(enc.outputs, self.key_proj.weight).float()
        return AttentionMemory(keys=keys, values=enc.outputs, mask=enc.mask)

    def forward(self, query: torch.Tensor, memory: AttentionMemory) -> AttentionResult:
        return self.attend_projected(self.query_proj(query), memory)

    def attend_projected(self, projected: torch.Tensor, memory: AttentionMemory) -> AttentionResult:
        """Attention from queries already multiplied by W (+ bias), (B, T, A)."""
        q = projected.float().unsqueeze(2)  # (B, T, 1, A)
        with torch.autocast(q.device.type, enabled=False):
            scores = AdditiveScores.apply(q, memory.keys.unsqueeze(1), self.energy.weight.view(-1))  # (B, T, S)
        weights = masked_softmax(scores, memory.mask)
        return AttentionResult(context=memory.read(weights), weights=weights)


class MultiplicativeAttention(Attention):
    """Luong et al. 2015, section 3.1: ``general`` score(h_t, h_s) = h_t^T W_a h_s, or ``dot``
    score = h_t^T h_s (no parameters; needs equal sizes). W_a h_s is precomputed once per batch."""

    def __init__(self, query_size: int, value_size: int, general: bool) -> None:
        super().__init__(query_size, value_size)
        if not general and query_size != value_size:
            raise ValueError(f"dot attention needs equal query and value sizes ({query_size} != {value_size})")
        self.general = general
        self.key_proj = nn.Linear(value_size, query_size, bias=False) if general else nn.Identity()

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        keys = shapes.linear(enc.outputs, self.key_proj.weight) if self.general else enc.outputs
        return AttentionMemory(keys=keys, values=enc.outputs, mask=enc.mask)

    def forward(self, query: torch.Tensor, memory: AttentionMemory) -> AttentionResult:
        weights = masked_softmax(memory.scores(query), memory.mask)  # (B, T, S)
        return AttentionResult(context=memory.read(weights), weights=weights)
