"""Greedy decoding of many sentences with continuous batching.

Decoding batch by batch runs each batch until its longest output has ended: on the Multi30k test
set a third of the greedy steps ran with 8 of 64 rows, and a step costs nearly as much with 8 rows
as with 64 (every step reads all the weights: about 1.3 against 2.1 ms on the CPU, see
docs/results.md). Here up to ``cfg.batch_size`` sentences are in flight; as soon as ROW_MULTIPLE
of them have ended, their rows are handed to the next sentences, so almost every step runs full.
The encoder still runs a batch at a time; a batch is encoded when its first sentence is needed.

Each row is decoded as ``greedy_search`` decodes it, with its own step count, length cap and
score. It attends over the widest source in flight with the rest masked, which changes its
numbers by float rounding at most (tested against ``greedy_search``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch

from seq2seq.attention import AttentionMemory
from seq2seq.batching import Batch
from seq2seq.config import SearchConfig
from seq2seq.decoder import DecoderState
from seq2seq.model import SearchWeights, Seq2Seq
from seq2seq.search import ROW_MULTIPLE, Hypothesis, compact_to, kept_rows, max_lengths
from seq2seq.stepscores import greedy_choice
from seq2seq.tokenizer import BOS_ID, EOS_ID


class _Rows(NamedTuple):
    """Encoded sentences: their indices, length caps, initial decoder states and memories."""

    ids: torch.Tensor  # (N,) sentence indices (``Batch.indices``)
    limit: torch.Tensor  # (N,) output cap, EOS included
    state: DecoderState
    memory: AttentionMemory

    def __len__(self) -> int:
        return self.ids.numel()

    def slice(self, start: int, stop: int) -> _Rows:
        return _Rows(self.ids[start:stop], self.limit[start:stop],
                     DecoderState(self.state.hidden[:, start:stop], self.state.cell[:, start:stop],
                                  self.state.feed[start:stop]),
                     AttentionMemory(*(t[start:stop] for t in self.memory[:3])))


def _widen(memory: AttentionMemory, width: int) -> AttentionMemory:
    """``memory`` over a source axis of ``width`` positions, the new ones masked."""
    extra = width - memory.mask.size(1)
    if extra <= 0:
        return memory
    return AttentionMemory(*(torch.cat([t, t.new_zeros((t.size(0), extra, *t.shape[2:]))], dim=1)
                             for t in memory[:3]))


def _concat(parts: list[_Rows]) -> _Rows:
    """The parts' rows as one set of fresh tensors (never views of a batch still being drawn)."""
    width = max(p.memory.mask.size(1) for p in parts)
    memories = [_widen(p.memory, width) for p in parts]
    return _Rows(torch.cat([p.ids for p in parts]), torch.cat([p.limit for p in parts]),
                 DecoderState(torch.cat([p.state.hidden for p in parts], dim=1),
                              torch.cat([p.state.cell for p in parts], dim=1),
                              torch.cat([p.state.feed for p in parts])),
                 AttentionMemory(*(torch.cat([m[i] for m in memories]) for i in range(3))))


class _Source:
    """Encoded sentences waiting for a row, drawn in order, one batch encoded at a time."""

    def __init__(self, model: Seq2Seq, batches: Iterable[Batch], cfg: SearchConfig, cap: int) -> None:
        self.model, self.cfg, self.cap = model, cfg, cap
        self.batches: Iterator[Batch] | None = iter(batches)  # None once used up
        self.rows: _Rows | None = None
        self.next = 0  # the first row of ``rows`` not drawn yet

    def _refill(self) -> None:
        while self.batches is not None and (self.rows is None or self.next == len(self.rows)):
            batch = next(self.batches, None)
            if batch is None:
                self.rows, self.batches = None, None
                return
            encoded = self.model.encode(batch.src, batch.src_lengths, batch.src_mask)
            limit = max_lengths(batch.src_lengths, self.cfg, self.cap).to(batch.src.device)
            self.rows = _Rows(batch.indices.to(batch.src.device), limit, encoded.state, encoded.memory)
            self.next = 0

    @property
    def exhausted(self) -> bool:
        self._refill()
        return self.rows is None

    def take(self, count: int) -> _Rows | None:
        """Up to ``count`` rows (fewer only once the input is used up); None when there are none.
        They may be views of an encoded batch: copy them before writing to them."""
        parts = []
        while count > 0 and not self.exhausted:
            assert self.rows is not None
            stop = min(len(self.rows), self.next + count)
            parts.append(self.rows.slice(self.next, stop))
            count -= stop - self.next
            self.next = stop
        return None if not parts else parts[0] if len(parts) == 1 else _concat(parts)


class _Pool:
    """The rows in flight and what each has produced: ``t[r]`` tokens so far (EOS included once
    it has ended), in ``tokens[r, :t[r]]``; ``ids[r]`` is -1 once the row's result is out."""

    def __init__(self, rows: _Rows, cap: int) -> None:
        n, device = len(rows), rows.ids.device
        self.ids, self.limit, self.state, self.memory = _concat([rows])  # own copies: rows change in place
        self.t = torch.zeros(n, dtype=torch.long, device=device)
        self.score = torch.zeros(n, device=device)
        self.finished = torch.zeros(n, dtype=torch.bool, device=device)
        self.prev = torch.full((n,), BOS_ID, dtype=torch.long, device=device)
        # a finished row keeps writing (EOS or anything) at position t <= its cap <= ``cap``
        self.tokens = torch.full((n, cap + 1), EOS_ID, dtype=torch.long, device=device)
        self.rows = torch.arange(n, device=device)

    def __len__(self) -> int:
        return self.ids.numel()

    def steps_before_cap(self) -> int:
        """Steps before the first at which some unfinished row may reach its cap (a host sync)."""
        left = torch.where(self.finished, self.tokens.size(1), self.limit - self.t)
        return int(left.min()) - 1

    def step(self, model: Seq2Seq, weights: SearchWeights, check_cap: bool) -> None:
        out = model.decode_step(self.prev, self.state, self.memory, weights)
        at_cap = (self.t + 1) >= self.limit if check_cap else None
        step_score, tok = greedy_choice(out.logits, at_cap)
        alive = ~self.finished
        self.score.add_(torch.where(alive, step_score, 0.0))
        self.tokens[self.rows, self.t] = tok
        self.t.add_(alive)
        self.finished |= tok == EOS_ID
        self.prev, self.state = tok, out.state

    def results(self, slots: torch.Tensor) -> list[tuple[int, Hypothesis]]:
        """The hypotheses of rows ``slots`` (all ended) not given out yet; marks them given."""
        ids, lengths, scores = (x.index_select(0, slots).tolist() for x in (self.ids, self.t, self.score))
        tokens = self.tokens.index_select(0, slots)[:, : max(lengths, default=0)].tolist()
        self.ids.index_fill_(0, slots, -1)
        return [(i, Hypothesis(tokens=seq[: n - 1], score=s, attention=None))
                for i, n, s, seq in zip(ids, lengths, scores, tokens) if i >= 0]

    def replace(self, slots: torch.Tensor, rows: _Rows) -> None:
        """New sentences in rows ``slots`` (as many as ``rows`` has; their results are out)."""
        slots = slots[: len(rows)]
        width = max(self.memory.mask.size(1), rows.memory.mask.size(1))
        self.memory, memory = _widen(self.memory, width), _widen(rows.memory, width)
        for dest, src in zip(self.memory[:3], memory[:3]):
            dest.index_copy_(0, slots, src)
        # a decoded state may differ in dtype from a fresh one (bf16 from the bridge under
        # autocast, float32 from the LSTM cell)
        for axis, dest, src in ((1, self.state.hidden, rows.state.hidden), (1, self.state.cell, rows.state.cell),
                                (0, self.state.feed, rows.state.feed)):
            dest.index_copy_(axis, slots, src.to(dest.dtype))
        self.ids.index_copy_(0, slots, rows.ids)
        self.limit.index_copy_(0, slots, rows.limit)
        for x, value in ((self.t, 0), (self.score, 0.0), (self.finished, False), (self.prev, BOS_ID),
                         (self.tokens, EOS_ID)):
            x.index_fill_(0, slots, value)

    def keep(self, keep: torch.Tensor) -> None:
        """Only rows ``keep`` stay in flight."""
        self.ids, self.limit, self.t, self.score, self.finished, self.prev, self.tokens = (
            x.index_select(0, keep) for x in (self.ids, self.limit, self.t, self.score, self.finished,
                                              self.prev, self.tokens))
        self.state, self.memory = self.state.select(keep), self.memory.select(keep)
        self.rows = torch.arange(keep.numel(), device=keep.device)


@torch.no_grad()
def stream_greedy(model: Seq2Seq, batches: Iterable[Batch], cfg: SearchConfig, weights: SearchWeights,
                  cap: int = 512) -> Iterator[tuple[int, Hypothesis]]:
    """(sentence index, hypothesis) for every sentence of ``batches``, as sentences end.
    ``weights``: ``model.step_weights()``, made in the autocast setting the search runs in."""
    source = _Source(model, batches, cfg, cap)
    first = source.take(cfg.batch_size)
    if first is None:
        return
    pool = _Pool(first, cap)
    before_cap = pool.steps_before_cap()
    while True:
        pool.step(model, weights, check_cap=before_cap <= 0)
        before_cap -= 1
        done = int(pool.finished.sum())  # the step's one host sync
        n = len(pool)
        if done == n and source.exhausted:
            yield from pool.results(pool.rows)
            return
        if done >= ROW_MULTIPLE and not source.exhausted or done == n:
            # hand the ended rows to the next sentences
            slots = pool.finished.nonzero().squeeze(1)
            yield from pool.results(slots)
            incoming = source.take(slots.numel())
            if incoming is not None:
                pool.replace(slots, incoming)
            before_cap = pool.steps_before_cap()
        elif source.exhausted:
            count = compact_to(done, n)  # the input is used up: drop ended rows as greedy_search does
            if count < n:
                keep = kept_rows(pool.finished, count)
                gone = torch.ones(n, dtype=torch.bool, device=keep.device)
                gone[keep] = False
                yield from pool.results(gone.nonzero().squeeze(1))
                pool.keep(keep)
                before_cap = pool.steps_before_cap()
