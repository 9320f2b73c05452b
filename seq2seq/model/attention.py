"""Attention modules: one stateless interface for "no attention", Bahdanau and Luong.

``prepare`` turns the encoder output into an ``AttentionMemory`` once per batch (this is where key
projections are computed); ``forward`` scores any number of queries against it. Nothing is stored
on the module between calls, so the same module serves training, greedy and beam search.

Every scored attention can have several heads (``heads``): the query and key projections and the
encoder states are split into ``heads`` equal parts, each head attends on its own, and the
contexts are concatenated, so the context keeps its size (multi-head attention over the encoder
states, Vaswani et al. 2017, 3.2.2, without extra output projection: the decoder's W_c follows).
The weights a module returns are the heads' mean, a distribution like any one head's. And the
scores become weights through a ``normalizer``: softmax, or sparsemax / 1.5-entmax, which give
exact zeros (Martins & Astudillo 2016; Peters et al. 2019).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from seq2seq.core.config import Normalizer
from seq2seq.model.encoder import EncoderOutput


class AttentionMemory(NamedTuple):
    # Every tensor is (B, S, ...): search handles them alike. With several heads, keys that are
    # scored per head and the values are (B, S, H, K / H), stored head-major (see ``head_major``).
    keys: torch.Tensor  # (B, S, K) projected keys, computed once per batch
    values: torch.Tensor  # (B, S, D) encoder states that contexts are averaged from
    mask: torch.Tensor  # (B, S) True at real tokens

    # What search does with rows of memories (seq2seq/search/continuous.py).

    def select(self, index: torch.Tensor) -> AttentionMemory:
        """Rows ``index`` of the batch (search compacts with this), head-major tensors kept so."""
        return AttentionMemory(*(_batch_first(_batch_first(t).index_select(0, index)) for t in self))

    @property
    def width(self) -> int:
        """Source positions (padding included)."""
        return self.mask.size(1)

    def rows(self, start: int, stop: int) -> AttentionMemory:
        """Rows ``start:stop`` (views)."""
        return AttentionMemory(*(t[start:stop] for t in self))

    def widen(self, width: int) -> AttentionMemory:
        """The memory over a source axis of ``width`` positions, the new ones masked."""
        if width <= self.width:
            return self
        return AttentionMemory(*(pad_sources(t, width) for t in self))

    @staticmethod
    def cat(memories: list[AttentionMemory], width: int) -> AttentionMemory:
        """The memories' rows as one fresh memory over ``width`` source positions."""
        memories = [m.widen(width) for m in memories]
        return AttentionMemory(*(_batch_first(torch.cat([_batch_first(m[i]) for m in memories]))
                                 for i in range(len(AttentionMemory._fields))))

    def put(self, rows: torch.Tensor, src: AttentionMemory) -> AttentionMemory:
        """This memory, widened to ``src``'s width if narrower, with rows ``rows`` overwritten by
        ``src``'s (whose dtype may differ: the encoder's output dtype may vary by batch)."""
        dest, src = self.widen(src.width), src.widen(self.width)
        for d, s in zip(dest, src, strict=True):
            d.index_copy_(0, rows, s.to(d.dtype))
        return dest


def pad_sources(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` (rows, S, ...) with zeros appended along the source axis up to ``width`` positions
    (a head-major tensor stays head-major)."""
    if t.dim() == 4:
        heads = _batch_first(t)  # (B, H, S, d)
        padding = heads.new_zeros((heads.size(0), heads.size(1), width - heads.size(2), heads.size(3)))
        return _batch_first(torch.cat([heads, padding], dim=2))
    return torch.cat([t, t.new_zeros((t.size(0), width - t.size(1), *t.shape[2:]))], dim=1)


def _batch_first(t: torch.Tensor) -> torch.Tensor:
    """A per-head memory tensor (B, S, H, d), stored head-major, as the contiguous (B, H, S, d)
    it is a view of, and back (the transpose is its own inverse); other tensors as they are.
    Search's row operations go through it, so their results keep the layout ``head_major`` chose."""
    return t.transpose(1, 2) if t.dim() == 4 else t


class AttentionResult(NamedTuple):
    context: torch.Tensor  # (B, T, D)
    weights: torch.Tensor | None  # (B, T, S), rows sum to 1, exactly 0 at padding; None: no attention


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis of (B, T, S) scores with padded positions at exactly zero
    (their score is -inf before the softmax), in float32."""
    return torch.softmax(scores.masked_fill(~mask.unsqueeze(1), float("-inf")), dim=-1, dtype=torch.float32)


def read(weights: torch.Tensor, memory: AttentionMemory) -> torch.Tensor:
    """Contexts (B, T, D): the attention-weighted average of the values."""
    return torch.bmm(weights.to(memory.values.dtype), memory.values)


def normalize(scores: torch.Tensor, mask: torch.Tensor, normalizer: Normalizer) -> torch.Tensor:
    """Weights from scores (..., T, S) over the last axis, in float32, exactly 0 at padding
    (``mask`` (B, S) broadcast over the middle axes)."""
    return normalize_where(scores, mask.view(mask.size(0), *([1] * (scores.dim() - 2)), mask.size(1)), normalizer)


def normalize_where(scores: torch.Tensor, keep: torch.Tensor, normalizer: Normalizer) -> torch.Tensor:
    """``normalize`` with ``keep`` (True where a position may be attended) broadcastable to
    ``scores``; every row must keep at least one position."""
    dtype = torch.promote_types(scores.dtype, torch.float32)  # float32, or float64 in gradcheck
    if normalizer == Normalizer.softmax:
        return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1, dtype=dtype)
    import entmax  # sparse normalizers: sorting-based, exact (the ``entmax`` package)

    # The sort-based thresholds need finite inputs: a padded score far below every real one is
    # never in the support, and the product with the mask makes its zero exact.
    scores = scores.to(dtype).masked_fill(~keep, -1e9)
    sparse = entmax.sparsemax if normalizer == Normalizer.sparsemax else entmax.entmax15
    return sparse(scores, dim=-1) * keep


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H * d) -> (B, H, L, d)."""
    b, length, size = x.shape
    return x.view(b, length, heads, size // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) -> (B, L, H * d)."""
    b, heads, length, size = x.shape
    return x.transpose(1, 2).reshape(b, length, heads * size)


def head_major(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, H * d) -> (B, S, H, d) whose storage is (B, H, S, d): its ``transpose(1, 2)`` is
    contiguous, so each decoding step's per-head products read it as is. Split once per batch in
    ``prepare``; split at every step, the copy took a fifth of a 4-head training step."""
    return split_heads(x, heads).contiguous().transpose(1, 2)


def read_heads(weights: torch.Tensor, memory: AttentionMemory) -> torch.Tensor:
    """Contexts (B, T, D) from per-head weights (B, H, T, S): each head averages its own slice
    of the values ((B, S, H, D / H), ``head_major``)."""
    values = memory.values.transpose(1, 2)  # (B, H, S, D / H)
    return merge_heads(torch.matmul(weights.to(values.dtype), values))


class RelativeBias(nn.Module):
    """A learned score bias per clipped distance between source position j and the step's
    expected source position e_t = t * rho (``positions`` t): the relative positions of the
    transformer exercises, adapted to cross-attention. rho (``length_ratio``, a buffer saved with
    the model) is the training data's source/target length ratio, set once by the trainer: the
    target length is unknown while decoding, so training uses the same estimate of i * S / T.
    Local attention has its own centre p_t and reads the bias of j - p_t with ``at``."""

    def __init__(self, max_distance: int, heads: int) -> None:
        super().__init__()
        self.max_distance = max_distance
        self.bias = nn.Embedding(2 * max_distance + 1, heads)
        nn.init.zeros_(self.bias.weight)  # start as plain attention
        self.register_buffer("length_ratio", torch.ones(()))

    def forward(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """(B, H, T, S) biases for target positions (B, T) over ``length`` source positions."""
        expected = positions.to(self.length_ratio.dtype) * self.length_ratio  # (B, T)
        source = torch.arange(length, device=positions.device, dtype=expected.dtype)
        return self.at(torch.round(source - expected.unsqueeze(-1)).long()).permute(0, 3, 1, 2)

    def at(self, distance: torch.Tensor) -> torch.Tensor:
        """Biases (..., H) of integer distances (...) j - centre, clipped to +-max_distance."""
        return self.bias(distance.clamp(-self.max_distance, self.max_distance) + self.max_distance)


def with_bias(scores: torch.Tensor, relative: RelativeBias | None, positions: torch.Tensor | None) -> torch.Tensor:
    """``scores`` (B, T, S) or (B, H, T, S) plus the relative position bias, where there is one."""
    if relative is None:
        return scores
    if positions is None:
        raise ValueError("a relative position bias needs the target positions")
    bias = relative(positions, scores.size(-1))
    return scores + (bias.squeeze(1) if scores.dim() == 3 else bias).to(scores.dtype)


class Attention(nn.Module):
    """Base class. ``query_free`` attention ignores the query (so the decoder may run in parallel);
    ``needs_positions`` attention reads each query's target position (``forward``'s ``positions``)."""

    query_free = False
    needs_positions = False
    uses_coverage = False  # scores read the coverage vector (forward's ``coverage``)

    def __init__(self, query_size: int, value_size: int, heads: int = 1,
                 normalizer: Normalizer = Normalizer.softmax, relative_distance: int = 0) -> None:
        super().__init__()
        self.query_size = query_size
        self.value_size = value_size
        self.heads = heads
        self.normalizer = normalizer
        # relative_distance > 0: a learned bias per clipped relative position (RelativeBias)
        self.relative = RelativeBias(relative_distance, heads) if relative_distance > 0 else None
        if self.relative is not None:
            self.needs_positions = True

    @property
    def standard(self) -> bool:
        """One head, softmax, no position bias: the attention the CPU kernels implement
        (seq2seq/model/fast.py)."""
        return self.heads == 1 and self.normalizer == Normalizer.softmax and self.relative is None

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        raise NotImplementedError

    def forward(self, query: torch.Tensor, memory: AttentionMemory, positions: torch.Tensor | None = None,
                coverage: torch.Tensor | None = None) -> AttentionResult:
        """Attention for (B, T, Q) queries against a memory of B rows; ``positions`` (B, T): the
        target position (0-based step) of each query, and ``coverage`` (B, T, S): the attention
        each source position got before the query's step, for the attentions that read them."""
        raise NotImplementedError


class NoAttention(Attention):
    """The fixed-vector encoder-decoder (Cho et al. 2014; RNNencdec in Bahdanau et al. 2015):
    every step gets the same context, the encoder's summary, and nothing else of the source."""

    query_free = True

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        summary = enc.summary.unsqueeze(1)  # (B, 1, D)
        mask = torch.ones(summary.shape[:2], dtype=torch.bool, device=summary.device)
        return AttentionMemory(keys=summary, values=summary, mask=mask)

    def forward(self, query: torch.Tensor, memory: AttentionMemory, positions: torch.Tensor | None = None,
                coverage: torch.Tensor | None = None) -> AttentionResult:
        b, t = query.shape[:2]
        return AttentionResult(context=memory.values.expand(b, t, -1), weights=None)


class AdditiveAttention(Attention):
    """score(q, h_j) = v^T tanh(W q + U h_j). Bahdanau et al. 2015, appendix A.1.2 (with the
    previous decoder state as q), and Luong et al. 2015's ``concat`` score (current state).
    U h_j is computed once per batch (``prepare``)."""

    def __init__(self, query_size: int, value_size: int, hidden_size: int, heads: int = 1,
                 normalizer: Normalizer = Normalizer.softmax, coverage: bool = False,
                 relative_distance: int = 0) -> None:
        super().__init__(query_size, value_size, heads, normalizer, relative_distance)
        self.key_proj = nn.Linear(value_size, hidden_size, bias=False)  # U
        self.query_proj = nn.Linear(query_size, hidden_size, bias=True)  # W (+ bias)
        # v: one row per head, over that head's part of the hidden layer ((1, A) for one head)
        self.energy = nn.Linear(hidden_size // heads, heads, bias=False)
        self.uses_coverage = coverage
        if coverage:  # w_c: score(q, h_j, c_j) = v^T tanh(W q + U h_j + w_c c_j) (See et al. 2017, eq. 11)
            self.coverage_proj = nn.Linear(1, hidden_size, bias=False)

    @property
    def standard(self) -> bool:
        return super().standard and not self.uses_coverage

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        # the keys are only added to the queries, so they stay whole; each head reads its values
        values = enc.outputs if self.heads == 1 else head_major(enc.outputs, self.heads)
        return AttentionMemory(keys=self.key_proj(enc.outputs), values=values, mask=enc.mask)

    def forward(self, query: torch.Tensor, memory: AttentionMemory, positions: torch.Tensor | None = None,
                coverage: torch.Tensor | None = None) -> AttentionResult:
        # (B, T, 1, A) + (B, 1, S, A): every query against every key
        inputs = self.query_proj(query).unsqueeze(2) + memory.keys.unsqueeze(1)
        if self.uses_coverage and coverage is not None:  # (B, T, S, 1) x (A,)
            inputs = inputs + coverage.unsqueeze(-1).to(inputs.dtype) * self.coverage_proj.weight.view(-1)
        energies = torch.tanh(inputs)
        if self.heads == 1:
            scores = with_bias(self.energy(energies).squeeze(-1), self.relative, positions)  # (B, T, S)
            weights = normalize(scores, memory.mask, self.normalizer)
            return AttentionResult(context=read(weights, memory), weights=weights)
        b, t, s, a = energies.shape
        parts = energies.view(b, t, s, self.heads, a // self.heads)
        scores = (parts * self.energy.weight.to(parts.dtype)).sum(-1).permute(0, 3, 1, 2)  # (B, H, T, S)
        weights = normalize(with_bias(scores, self.relative, positions), memory.mask, self.normalizer)
        return AttentionResult(context=read_heads(weights, memory), weights=weights.mean(1))


class MultiplicativeAttention(Attention):
    """Luong et al. 2015, section 3.1: ``general`` score(h_t, h_s) = h_t^T W_a h_s, or ``dot``
    score = h_t^T h_s (no parameters; needs equal sizes); ``scaled`` divides the score by the
    square root of the (per-head) key size, as scaled dot-product attention does (Vaswani et al.
    2017, 3.2.1), so the softmax does not saturate as the size grows. W_a h_s is computed once
    per batch."""

    def __init__(self, query_size: int, value_size: int, general: bool, scaled: bool = False, heads: int = 1,
                 normalizer: Normalizer = Normalizer.softmax, relative_distance: int = 0) -> None:
        super().__init__(query_size, value_size, heads, normalizer, relative_distance)
        if not general and query_size != value_size:
            raise ValueError(f"dot attention needs equal query and value sizes ({query_size} != {value_size})")
        self.general = general
        self.scaled = scaled
        self.key_proj = nn.Linear(value_size, query_size, bias=False) if general else nn.Identity()

    @property
    def standard(self) -> bool:
        return super().standard and not self.scaled

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        keys = self.key_proj(enc.outputs)
        if self.heads == 1:
            return AttentionMemory(keys=keys, values=enc.outputs, mask=enc.mask)
        return AttentionMemory(keys=head_major(keys, self.heads), values=head_major(enc.outputs, self.heads),
                               mask=enc.mask)

    def forward(self, query: torch.Tensor, memory: AttentionMemory, positions: torch.Tensor | None = None,
                coverage: torch.Tensor | None = None) -> AttentionResult:
        if self.heads == 1:
            scores = torch.bmm(query, memory.keys.transpose(1, 2).to(query.dtype))  # (B, T, S)
            if self.scaled:
                scores = scores / math.sqrt(query.size(-1))
            weights = normalize(with_bias(scores, self.relative, positions), memory.mask, self.normalizer)
            return AttentionResult(context=read(weights, memory), weights=weights)
        q = split_heads(query, self.heads)  # (B, H, T, Q / H)
        k = memory.keys.transpose(1, 2).to(query.dtype)  # (B, H, S, Q / H), head_major
        scores = torch.matmul(q, k.transpose(2, 3))  # (B, H, T, S)
        if self.scaled:
            scores = scores / math.sqrt(q.size(-1))
        weights = normalize(with_bias(scores, self.relative, positions), memory.mask, self.normalizer)
        return AttentionResult(context=read_heads(weights, memory), weights=weights.mean(1))


class LocalAttention(Attention):
    """Local attention (Luong et al. 2015, section 3.2): step t scores only the 2D+1 source
    positions of the window [p_t - D, p_t + D] (those inside the sentence), so a step's time
    and memory do not grow with the source length.

    - ``monotonic`` (local-m): p_t = t, the target position, assuming a roughly monotone alignment.
    - ``predictive`` (local-p): p_t = S sigmoid(v_p^T tanh(W_p h_t)) with S the source length, and
      the weights are multiplied by exp(-(s - p_t)^2 / (2 sigma^2)), sigma = D / 2, favouring
      positions near p_t (eq. 10; as in the paper, not renormalised, so a step's weights sum to
      at most 1).

    With ``relative_distance`` > 0 a learned bias per distance j - p_t (``RelativeBias.at``;
    p_t rounded, the window's centre) is added to the window's scores: the relative positions of
    the transformer exercises, centred where local attention looks.

    ``scorer`` gives the score of a query against the window's keys: the module of any global
    score (``dot``, ``general``, ``scaled_dot``, ``concat``), whose parameters it uses. The weights
    returned are placed in a (B, T, S) tensor, exactly 0 outside the window. A single step (search,
    the input-feeding loop) gathers its window's keys and values, so its cost does not grow with
    the source; many dot-product queries at once take the band of one score matmul (``_banded``).
    """

    needs_positions = True

    def __init__(self, scorer: AdditiveAttention | MultiplicativeAttention, window: int, predictive: bool,
                 relative_distance: int = 0) -> None:
        super().__init__(scorer.query_size, scorer.value_size, 1, scorer.normalizer, relative_distance)
        self.scorer = scorer
        self.window = window
        self.predictive = predictive
        if predictive:
            self.position_proj = nn.Linear(scorer.query_size, scorer.query_size, bias=False)  # W_p
            self.position_score = nn.Linear(scorer.query_size, 1, bias=False)  # v_p

    @property
    def standard(self) -> bool:
        return False

    def prepare(self, enc: EncoderOutput) -> AttentionMemory:
        return self.scorer.prepare(enc)

    def _scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Scores (B, T, W) of queries (B, T, Q) against their windows' keys (B, T, W, K)."""
        scorer = self.scorer
        if isinstance(scorer, AdditiveAttention):
            energies = torch.tanh(scorer.query_proj(query).unsqueeze(2) + keys)
            return scorer.energy(energies).squeeze(-1)
        scores = (query.unsqueeze(2) * keys.to(query.dtype)).sum(-1)
        return scores / math.sqrt(query.size(-1)) if scorer.scaled else scores

    def forward(self, query: torch.Tensor, memory: AttentionMemory, positions: torch.Tensor | None = None,
                coverage: torch.Tensor | None = None) -> AttentionResult:
        b, t, _ = query.shape
        s = memory.mask.size(1)
        lengths = memory.mask.sum(1).view(b, 1)  # (B, 1) real source positions, EOS included
        if self.predictive:
            raw = self.position_score(torch.tanh(self.position_proj(query))).squeeze(-1)
            gate = torch.sigmoid(raw.to(torch.promote_types(raw.dtype, torch.float32)))  # p_t in float32
            aligned = lengths.to(gate.dtype) * gate  # (B, T) real-valued p_t in [0, S]
            centre = aligned.detach().round().long()
        else:
            if positions is None:
                raise ValueError("monotonic local attention needs the target positions")
            centre = positions.to(lengths.device).long()
            aligned = None
        centre = torch.minimum(centre, lengths - 1)
        if t > 1 and isinstance(self.scorer, MultiplicativeAttention):
            return self._banded(query, memory, centre, lengths, aligned)
        offsets = torch.arange(-self.window, self.window + 1, device=query.device)
        index = centre.unsqueeze(-1) + offsets  # (B, T, W)
        inside = (index >= 0) & (index < lengths.unsqueeze(-1))
        index = index.clamp(0, s - 1)
        flat = index.view(b, t * offsets.numel())

        def gather(x: torch.Tensor) -> torch.Tensor:
            picked = x.gather(1, flat.unsqueeze(-1).expand(-1, -1, x.size(-1)))
            return picked.view(b, t, offsets.numel(), x.size(-1))

        scores = self._scores(query, gather(memory.keys))  # (B, T, W)
        if self.relative is not None:  # the window's offsets are the distances to its centre
            scores = scores + self.relative.at(offsets).squeeze(-1).to(scores.dtype)
        weights = normalize_where(scores, inside, self.normalizer)
        if aligned is not None:
            sigma = self.window / 2
            weights = weights * torch.exp(-((index.to(aligned.dtype) - aligned.unsqueeze(-1)) ** 2) / (2 * sigma**2))
        values = gather(memory.values)
        context = torch.matmul(weights.unsqueeze(2).to(values.dtype), values).squeeze(2)  # (B, T, D)
        full = weights.new_zeros(b, t, s).scatter_add_(2, index, weights * inside)
        return AttentionResult(context=context, weights=full)

    def _banded(self, query: torch.Tensor, memory: AttentionMemory, centre: torch.Tensor, lengths: torch.Tensor,
                aligned: torch.Tensor | None) -> AttentionResult:
        """Many queries at once with a dot-product score (the parallel training pass): the band
        of one (B, T, S) score matmul, the rest masked to exactly 0. Gathering each query's
        window of keys would hold (B, T, 2D+1, K) numbers, more than the (B, T, S) scores
        unless S > (2D+1) K; the weights and contexts are the same."""
        scores = torch.bmm(query, memory.keys.transpose(1, 2).to(query.dtype))  # (B, T, S)
        if self.scorer.scaled:
            scores = scores / math.sqrt(query.size(-1))
        position = torch.arange(scores.size(-1), device=query.device)
        distance = position - centre.unsqueeze(-1)  # (B, T, S)
        if self.relative is not None:
            scores = scores + self.relative.at(distance).squeeze(-1).to(scores.dtype)
        keep = (distance.abs() <= self.window) & (position < lengths.unsqueeze(-1))
        weights = normalize_where(scores, keep, self.normalizer)
        if aligned is not None:
            sigma = self.window / 2
            weights = weights * torch.exp(-((position.to(aligned.dtype) - aligned.unsqueeze(-1)) ** 2) / (2 * sigma**2))
        return AttentionResult(context=read(weights, memory), weights=weights)


class DecoderSelfAttention(nn.Module):
    """The decoder attending over its own LSTM outputs so far, itself included (the causal mask):
    q_t = W_q h_t, [k_j; v_j] = W_kv h_j, s_t = sum_{j <= t} softmax_j(q_t . k_j / sqrt(H)) v_j
    (Vaswani et al. 2017, 3.2.1, one head). The decoder adds s_t to h_t, before the attention over
    the source and the output layer; the LSTM's own recurrence is unchanged."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.query = nn.Linear(size, size, bias=False)
        self.key_value = nn.Linear(size, 2 * size, bias=False)

    def forward(self, hidden: torch.Tensor, history: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Contexts (B, T, H) of queries from ``hidden`` (B, T, H) over ``history`` (B, J, 2H) keys
        and values; ``allowed`` (B or 1, T, J) is True where query t may read position j."""
        keys, values = history.chunk(2, dim=-1)
        scores = _wide(torch.bmm(self.query(hidden), keys.to(hidden.dtype).transpose(1, 2))) / math.sqrt(self.size)
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        return torch.bmm(weights.to(values.dtype), values)

    def whole(self, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: every step of ``hidden`` (B, T, H) at once, each over the steps up to it."""
        t = hidden.size(1)
        causal = torch.ones(t, t, dtype=torch.bool, device=hidden.device).tril().unsqueeze(0)
        return self(hidden, _wide(self.key_value(hidden)), causal).to(hidden.dtype)

    def step(self, hidden: torch.Tensor, history: torch.Tensor, step: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step for rows (B, H) at target positions ``step`` (B,): the context (B, H), and the
        cache ``history`` (B, W, 2H) float32 with this step's key and value written at column
        ``step`` (widened when a row needs it). Columns after a row's step are never read: a row
        that starts a new sentence (continuous search) overwrites its old ones as it goes."""
        need = int(step.max()) + 1
        if history.size(1) < need:
            history = pad_sources(history, need)
        cols = torch.arange(history.size(1), device=hidden.device)
        mine = cols == step.unsqueeze(1)  # (B, W)
        history = torch.where(mine.unsqueeze(-1), _wide(self.key_value(hidden)).unsqueeze(1), history)
        allowed = (cols <= step.unsqueeze(1)).unsqueeze(1)  # (B, 1, W)
        return self(hidden.unsqueeze(1), history, allowed).squeeze(1).to(hidden.dtype), history


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 if it is (bf16 scores and caches lose too much; gradcheck runs float64)."""
    return x if x.dtype == torch.float64 else x.float()
