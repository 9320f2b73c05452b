"""Greedy decoding and beam search over many sentences with continuous batching.

Decoding batch by batch runs each batch until its longest output has ended: on the Multi30k test
set a third of the greedy steps ran with 8 of 64 rows, and a step costs nearly as much with 8 rows
as with 64 (every step reads all the weights: about 1.3 against 2.1 ms on the CPU, see
docs/results.md). Here up to ``cfg.batch_size`` sentences are in flight; as soon as SENTENCE_MULTIPLE
of them have ended, their rows are handed to the next sentences, so almost every step runs full
(and meets the same matmul shapes). The encoder still runs a batch at a time; a batch is encoded
when its first sentence is needed.

Each sentence is decoded as it would be alone (a batch of one), with its own step count, length
cap and scores. It attends over the widest source in flight with the rest masked,
which changes its numbers by float rounding at most (tested against both).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple, Protocol

import torch

from seq2seq.core.config import SearchConfig
from seq2seq.data.batching import Batch
from seq2seq.data.tokenizer import BOS_ID, EOS_ID
from seq2seq.model.engine import Engine
from seq2seq.search.common import (
    SENTENCE_MULTIPLE,
    Hypothesis,
    compact_to,
    kept_rows,
    length_penalty,
    max_lengths,
)
from seq2seq.search.stepscores import beam_candidates, greedy_choice


class _Rows(NamedTuple):
    """Encoded sentences: their indices, length caps, initial decoder states and memories.
    ``state`` and ``memory`` are any types with the row operations of ``DecoderState`` and
    ``AttentionMemory`` (select, rows, cat, put, widen): one model's, or an ensemble's."""

    ids: torch.Tensor  # (N,) sentence indices (``Batch.indices``)
    limit: torch.Tensor  # (N,) output cap, EOS included
    state: Any
    memory: Any

    def __len__(self) -> int:
        return self.ids.numel()

    def slice(self, start: int, stop: int) -> _Rows:
        return _Rows(self.ids[start:stop], self.limit[start:stop], self.state.rows(start, stop),
                     self.memory.rows(start, stop))


def _concat(parts: list[_Rows]) -> _Rows:
    """The parts' rows as one set of fresh tensors (never views of a batch still being drawn)."""
    width = max(p.memory.width for p in parts)
    first = parts[0]
    return _Rows(torch.cat([p.ids for p in parts]), torch.cat([p.limit for p in parts]),
                 type(first.state).cat([p.state for p in parts], width),
                 type(first.memory).cat([p.memory for p in parts], width))


class _Source:
    """Encoded sentences waiting for a row, drawn in order, one batch encoded at a time."""

    def __init__(self, engine: Engine, batches: Iterable[Batch], cfg: SearchConfig, cap: int) -> None:
        self.engine, self.cfg, self.cap = engine, cfg, cap
        self.batches: Iterator[Batch] | None = iter(batches)  # None once used up
        self.rows: _Rows | None = None
        self.next = 0  # the first row of ``rows`` not drawn yet

    def _refill(self) -> None:
        while self.batches is not None and (self.rows is None or self.next == len(self.rows)):
            batch = next(self.batches, None)
            if batch is None:
                self.rows, self.batches = None, None
                return
            encoded = self.engine.encode(batch.src, batch.src_lengths, batch.src_mask)
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


def _fill(slots: torch.Tensor, pairs: tuple[tuple[torch.Tensor, float | int | bool], ...]) -> None:
    for x, value in pairs:
        x.index_fill_(0, slots, value)


class _Pool(Protocol):
    """What the driver needs of the sentences in flight (one row each, or K for beam search)."""

    finished: torch.Tensor  # (N,) bool per sentence

    def __len__(self) -> int: ...
    def steps_before_cap(self) -> int: ...
    def step(self, engine: Engine, weights: Any, check_cap: bool) -> None: ...
    def results(self, slots: torch.Tensor) -> list[tuple[int, Hypothesis]]: ...
    def replace(self, slots: torch.Tensor, rows: _Rows) -> None: ...
    def keep(self, keep: torch.Tensor) -> None: ...


class _Sentences:
    """What every pool keeps per sentence: index, cap, steps taken (``t``), memory, and whether
    it has ended; ``ids[r]`` is -1 once sentence r's result is out."""

    def __init__(self, rows: _Rows) -> None:
        n, device = len(rows), rows.ids.device
        self.ids, self.limit, self.state, self.memory = _concat([rows])  # own copies: rows change in place
        self.t = torch.zeros(n, dtype=torch.long, device=device)
        self.finished = torch.zeros(n, dtype=torch.bool, device=device)
        self.sentences = torch.arange(n, device=device)

    def __len__(self) -> int:
        return self.ids.numel()

    def steps_before_cap(self) -> int:
        """Steps before the first at which some unfinished sentence may reach its cap (a host sync)."""
        left = torch.where(self.finished, torch.iinfo(torch.long).max, self.limit - self.t)
        return int(left.min()) - 1

    def _replace(self, slots: torch.Tensor, rows: _Rows) -> None:
        self.memory = self.memory.put(slots, rows.memory)
        self.ids.index_copy_(0, slots, rows.ids)
        self.limit.index_copy_(0, slots, rows.limit)
        _fill(slots, ((self.t, 0), (self.finished, False)))

    def _keep(self, keep: torch.Tensor) -> None:
        self.ids, self.limit, self.t, self.finished = (
            x.index_select(0, keep) for x in (self.ids, self.limit, self.t, self.finished))
        self.memory = self.memory.select(keep)
        self.sentences = torch.arange(keep.numel(), device=keep.device)


class _GreedyPool(_Sentences):
    """Greedy decoding: ``t[r]`` tokens so far (EOS included once it has ended), in
    ``tokens[r, :t[r]]``; with ``scored``, their log-probability in ``score[r]``."""

    def __init__(self, rows: _Rows, width: int, scored: bool) -> None:
        super().__init__(rows)
        n, device = len(rows), rows.ids.device
        self.scored = scored
        self.score = torch.zeros(n, device=device)
        self.prev = torch.full((n,), BOS_ID, dtype=torch.long, device=device)
        # a finished row keeps writing (EOS or anything) at position t <= its cap < ``width``
        self.tokens = torch.full((n, width), EOS_ID, dtype=torch.long, device=device)

    def step(self, engine: Engine, weights: Any, check_cap: bool) -> None:
        out = engine.decode_step(self.prev, self.state, self.memory, weights)
        at_cap = (self.t + 1) >= self.limit if check_cap else None
        step_score, tok = greedy_choice(out.logits, at_cap, self.scored)
        alive = ~self.finished
        if step_score is not None:
            self.score.add_(torch.where(alive, step_score, 0.0))
        self.tokens[self.sentences, self.t] = tok
        self.t.add_(alive)
        self.finished |= tok == EOS_ID
        self.prev, self.state = tok, out.state

    def results(self, slots: torch.Tensor) -> list[tuple[int, Hypothesis]]:
        """The hypotheses of rows ``slots`` (all ended) not given out yet; marks them given."""
        ids, lengths, scores = (x.index_select(0, slots).tolist() for x in (self.ids, self.t, self.score))
        tokens = self.tokens.index_select(0, slots)[:, : max(lengths, default=0)].tolist()
        self.ids.index_fill_(0, slots, -1)
        return [(i, Hypothesis(tokens=seq[: n - 1], score=s if self.scored else None, attention=None))
                for i, n, s, seq in zip(ids, lengths, scores, tokens) if i >= 0]

    def replace(self, slots: torch.Tensor, rows: _Rows) -> None:
        """New sentences in rows ``slots`` (as many as ``rows`` has; their results are out)."""
        slots = slots[: len(rows)]
        self._replace(slots, rows)
        self.state = self.state.put(slots, rows.state, self.memory.width)
        _fill(slots, ((self.score, 0.0), (self.prev, BOS_ID), (self.tokens, EOS_ID)))

    def keep(self, keep: torch.Tensor) -> None:
        """Only rows ``keep`` stay in flight."""
        self._keep(keep)
        self.score, self.prev, self.tokens = (x.index_select(0, keep) for x in (self.score, self.prev, self.tokens))
        self.state = self.state.select(keep)


def sentence_ended(is_eos: torch.Tensor, top_scores: torch.Tensor, fin_scores: torch.Tensor, alpha: float,
                   nbest: int = 1) -> torch.Tensor:
    """(N,) whether each sentence's beam search ends at this step, given its candidates (N, 2K),
    best first (``is_eos``, ``top_scores``) and its K best finished scores so far, this step's
    included.

    Without a length penalty (alpha 0) a hypothesis' score only falls as it grows, so once the best
    candidate is EOS no live hypothesis can overtake it: the sentence ends there (and beam 1 is
    greedy), for an n-best list once ``nbest`` have finished. With a length penalty a longer
    hypothesis may still overtake the finished ones after its normalisation, so, as in fairseq,
    the sentence goes on until K hypotheses have finished: ending at the first EOS would make the
    penalty re-rank only what had finished by then, and leave the output as short as with none.
    Either way it ends when no live hypothesis is left (at the cap every candidate is EOS; a tiny
    vocabulary may hold fewer than K hypotheses)."""
    finished = torch.isfinite(fin_scores).sum(-1)
    if alpha == 0:
        ended = is_eos[:, 0] & (finished >= nbest) if nbest > 1 else is_eos[:, 0]
    else:
        ended = finished >= fin_scores.size(1)
    live = torch.isfinite(torch.where(is_eos, float("-inf"), top_scores)).any(-1)
    return ended | ~live


class _BeamPool(_Sentences):
    """Beam search, K state rows per sentence (consecutive),
    each sentence at its own step ``t``: the K live hypotheses in ``history[:, :, :t]`` (EOS after
    them), the K best finished ones in ``fin_tokens`` / ``fin_len`` / ``fin_scores``."""

    def __init__(self, rows: _Rows, width: int, cfg: SearchConfig, vocab: int) -> None:
        super().__init__(rows)
        n, k, device = len(rows), cfg.beam_size, rows.ids.device
        self.k, self.alpha, self.nbest = k, cfg.length_penalty, cfg.nbest
        self.state = self.state.select(torch.arange(n, device=device).repeat_interleave(k))
        self.scores = torch.full((n, k), float("-inf"), device=device)
        self.scores[:, 0] = 0.0  # all beams start identical: keep one so the top-k are distinct
        self.history = torch.full((n, k, width), EOS_ID, dtype=torch.long, device=device)
        self.fin_scores = torch.full((n, k), float("-inf"), device=device)
        self.fin_tokens = torch.full((n, k, width), EOS_ID, dtype=torch.long, device=device)
        self.fin_len = torch.zeros((n, k), dtype=torch.long, device=device)
        self.prev = torch.full((n * k,), BOS_ID, dtype=torch.long, device=device)
        self.n_cand = min(2 * k, k * vocab)
        self.in_beam = torch.arange(self.n_cand, device=device) < k
        self.beam_offsets = torch.arange(k, device=device)

    def _beam_rows(self, sentences: torch.Tensor) -> torch.Tensor:
        return (sentences.unsqueeze(1) * self.k + self.beam_offsets).view(-1)

    def step(self, engine: Engine, weights: Any, check_cap: bool) -> None:
        k, n, width = self.k, len(self), self.history.size(2)
        out = engine.decode_step(self.prev, self.state, self.memory, weights)
        at_cap = ((self.t + 1) >= self.limit).repeat_interleave(k) if check_cap else None
        v = out.logits.size(-1)
        top_scores, top_idx = beam_candidates(out.logits, self.scores, at_cap, self.n_cand)  # (N, 2K)
        top_beam = torch.div(top_idx, v, rounding_mode="floor")
        top_tok = top_idx % v
        is_eos = top_tok == EOS_ID
        # Finished candidates compete with earlier finished ones on the normalised score. Only an
        # EOS among the K best candidates may finish a hypothesis (as in fairseq): the extra K
        # candidates exist to refill the beam, and letting a runner-up EOS finish would make beam
        # size 1 differ from greedy decoding.
        length = (self.t + 1).unsqueeze(1)
        new_fin = torch.where(is_eos & self.in_beam & ~self.finished.unsqueeze(1),
                              top_scores / length_penalty(length, self.alpha), float("-inf"))
        self.fin_scores, pick = torch.cat([self.fin_scores, new_fin], dim=1).topk(k, dim=-1)
        # a candidate's tokens: its beam's history, EOS from position t on (EOS ends it there)
        cand_tokens = torch.gather(self.history, 1, top_beam.unsqueeze(-1).expand(-1, -1, width))
        pool_tokens = torch.cat([self.fin_tokens, cand_tokens], dim=1)
        self.fin_tokens = torch.gather(pool_tokens, 1, pick.unsqueeze(-1).expand(-1, -1, width))
        pool_len = torch.cat([self.fin_len, length.expand(-1, self.n_cand)], dim=1)
        self.fin_len = torch.gather(pool_len, 1, pick)
        alive = ~self.finished
        self.finished |= sentence_ended(is_eos, top_scores, self.fin_scores, self.alpha, self.nbest)
        # the K best unfinished candidates continue
        self.scores, best = torch.where(is_eos, float("-inf"), top_scores).topk(k, dim=-1)
        beam = torch.gather(top_beam, 1, best)  # (N, K)
        tok = torch.gather(top_tok, 1, best)
        self.history = torch.gather(self.history, 1, beam.unsqueeze(-1).expand(-1, -1, width))
        self.history.scatter_(2, self.t.view(n, 1, 1).expand(-1, k, 1), tok.unsqueeze(-1))
        self.t.add_(alive)
        self.prev = tok.view(-1)
        self.state = out.state.select((self.sentences.unsqueeze(1) * k + beam).view(-1))

    def results(self, slots: torch.Tensor) -> list[tuple[int, Hypothesis]]:
        """The best finished hypothesis of sentences ``slots`` (all ended) not given out yet;
        marks them given."""
        fin_scores = self.fin_scores.index_select(0, slots)
        best = fin_scores.argmax(dim=-1, keepdim=True)
        lengths = self.fin_len.index_select(0, slots).gather(1, best).squeeze(1).tolist()
        tokens = self.fin_tokens.index_select(0, slots).gather(
            1, best.unsqueeze(-1).expand(-1, -1, self.fin_tokens.size(2))).squeeze(1)
        tokens = tokens[:, : max(lengths, default=0)].tolist()
        scores = fin_scores.gather(1, best).squeeze(1).tolist()
        ids = self.ids.index_select(0, slots).tolist()
        nbest = self._nbest(slots) if self.nbest > 1 else [None] * len(ids)
        self.ids.index_fill_(0, slots, -1)
        return [(i, Hypothesis(tokens=seq[: max(n - 1, 0)], score=s, attention=None, nbest=more))
                for i, n, s, seq, more in zip(ids, lengths, scores, tokens, nbest) if i >= 0]

    def _nbest(self, slots: torch.Tensor) -> list[list[tuple[list[int], float]]]:
        """The ``nbest`` best finished hypotheses of sentences ``slots``, best first."""
        scores, order = self.fin_scores.index_select(0, slots).sort(dim=-1, descending=True, stable=True)
        lengths = self.fin_len.index_select(0, slots).gather(1, order)
        tokens = self.fin_tokens.index_select(0, slots).gather(
            1, order.unsqueeze(-1).expand(-1, -1, self.fin_tokens.size(2)))
        out = []
        for row_scores, row_lengths, row_tokens in zip(scores.tolist(), lengths.tolist(), tokens.tolist()):
            out.append([(seq[: max(n - 1, 0)], s) for s, n, seq in
                        zip(row_scores[: self.nbest], row_lengths, row_tokens) if s != float("-inf")])
        return out

    def replace(self, slots: torch.Tensor, rows: _Rows) -> None:
        """New sentences in ``slots`` (as many as ``rows`` has; their results are out)."""
        slots = slots[: len(rows)]
        self._replace(slots, rows)
        beam_rows = self._beam_rows(slots)
        fresh = rows.state.select(torch.arange(len(rows), device=slots.device).repeat_interleave(self.k))
        self.state = self.state.put(beam_rows, fresh, self.memory.width)
        first = torch.full((self.k,), float("-inf"), device=slots.device)
        first[0] = 0.0
        self.scores.index_copy_(0, slots, first.repeat(len(rows), 1))
        _fill(slots, ((self.history, EOS_ID), (self.fin_scores, float("-inf")), (self.fin_tokens, EOS_ID),
                      (self.fin_len, 0)))
        self.prev.index_fill_(0, beam_rows, BOS_ID)

    def keep(self, keep: torch.Tensor) -> None:
        """Only sentences ``keep`` stay in flight."""
        beam_rows = self._beam_rows(keep)
        self._keep(keep)
        self.scores, self.history, self.fin_scores, self.fin_tokens, self.fin_len = (
            x.index_select(0, keep) for x in (self.scores, self.history, self.fin_scores, self.fin_tokens,
                                              self.fin_len))
        self.prev = self.prev.index_select(0, beam_rows)
        self.state = self.state.select(beam_rows)


def _drive(pool: _Pool, source: _Source, engine: Engine, weights: Any) -> Iterator[tuple[int, Hypothesis]]:
    """Step ``pool`` until every sentence of ``source`` has ended: ended sentences' places go to
    the next ones once SENTENCE_MULTIPLE have ended; when the input is used up, the pool shrinks as
    batch-by-batch search compacts."""
    before_cap = pool.steps_before_cap()
    while True:
        pool.step(engine, weights, check_cap=before_cap <= 0)
        before_cap -= 1
        done = int(pool.finished.sum())  # the step's one host sync
        n = len(pool)
        if done == n and source.exhausted:
            yield from pool.results(torch.arange(n, device=pool.finished.device))
            return
        if done >= SENTENCE_MULTIPLE and not source.exhausted or done == n:
            # hand the ended sentences' places to the next ones
            slots = pool.finished.nonzero().squeeze(1)
            yield from pool.results(slots)
            incoming = source.take(slots.numel())
            if incoming is not None:
                pool.replace(slots, incoming)
            before_cap = pool.steps_before_cap()
        elif source.exhausted:
            count = compact_to(done, n)  # the input is used up: drop ended sentences
            if count < n:
                keep = kept_rows(pool.finished, count)
                gone = torch.ones(n, dtype=torch.bool, device=keep.device)
                gone[keep] = False
                yield from pool.results(gone.nonzero().squeeze(1))
                pool.keep(keep)
                before_cap = pool.steps_before_cap()


def output_width(longest_source: int, cfg: SearchConfig, cap: int) -> int:
    """Token columns a pool needs: the largest output cap (EOS included) of a source of
    ``longest_source`` tokens (EOS included), plus one."""
    return int(max_lengths(torch.tensor([longest_source]), cfg, cap)) + 1


@torch.no_grad()
def stream_greedy(engine: Engine, batches: Iterable[Batch], cfg: SearchConfig, weights: Any,
                  cap: int = 512, width: int | None = None, scored: bool = True
                  ) -> Iterator[tuple[int, Hypothesis]]:
    """(sentence index, hypothesis) for every sentence of ``batches``, as sentences end.
    ``weights``: ``engine.search_weights()``, made in the autocast setting the search runs in;
    ``width``: ``output_width`` of the longest source (default: enough for any); without
    ``scored`` the hypotheses' scores are None and each step skips the vocabulary normaliser
    (about a tenth of a greedy step on the CPU)."""
    source = _Source(engine, batches, cfg, cap)
    first = source.take(cfg.batch_size)
    if first is not None:
        yield from _drive(_GreedyPool(first, width or cap + 1, scored), source, engine, weights)


@torch.no_grad()
def stream_beam(engine: Engine, batches: Iterable[Batch], cfg: SearchConfig, weights: Any,
                cap: int = 512, width: int | None = None) -> Iterator[tuple[int, Hypothesis]]:
    """Beam search (``cfg.beam_size``) as ``stream_greedy``: at most ``cfg.batch_size`` sentences
    (times K state rows) in flight. ``width`` as there; it is copied at every step here, so a
    tight one pays."""
    source = _Source(engine, batches, cfg, cap)
    first = source.take(cfg.batch_size)
    if first is not None:
        pool = _BeamPool(first, width or cap + 1, cfg, engine.model.output_layer.out_features)
        yield from _drive(pool, source, engine, weights)
