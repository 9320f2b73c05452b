"""Ensemble decoding: several trained models that share a tokenizer translate together. At every
step each model scores the next token from its own state, and the search ranks tokens by the mean
of the models' log-probabilities (renormalised, so a step's scores are a distribution again: the
normalised geometric mean of the models' distributions).

``EnsembleEngine`` is an ``Engine`` for search: its state and memory hold one model's each, with
the row operations continuous search applies (``select``, ``rows``, ``cat``, ``put``, ``widen``),
so greedy and beam search run unchanged. The members may differ in architecture (attention, sizes,
engine); they must share the source and target vocabularies, which ``check_same_tokenizer`` checks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.nn import functional as F

from seq2seq.model.engine import Engine
from seq2seq.model.network import EncodedSource, StepOutput

_P = TypeVar("_P", bound="_PerMember")


@dataclass(frozen=True)
class _PerMember:
    """One part per model; every row operation applies to each part alike."""

    parts: tuple

    def select(self: _P, index: torch.Tensor) -> _P:
        return type(self)(tuple(p.select(index) for p in self.parts))

    def rows(self: _P, start: int, stop: int) -> _P:
        return type(self)(tuple(p.rows(start, stop) for p in self.parts))

    def widen(self: _P, width: int) -> _P:
        return type(self)(tuple(p.widen(width) for p in self.parts))

    @classmethod
    def cat(cls: type[_P], items: list[_P], width: int) -> _P:
        return cls(tuple(type(parts[0]).cat(list(parts), width)
                         for parts in zip(*(i.parts for i in items), strict=True)))


class EnsembleState(_PerMember):
    """One DecoderState per model."""

    def put(self, rows: torch.Tensor, src: EnsembleState, width: int) -> EnsembleState:
        return EnsembleState(tuple(d.put(rows, s, width) for d, s in zip(self.parts, src.parts, strict=True)))


class EnsembleMemory(_PerMember):
    """One AttentionMemory per model, all over the same source positions."""

    @property
    def width(self) -> int:
        return self.parts[0].width

    def put(self, rows: torch.Tensor, src: EnsembleMemory) -> EnsembleMemory:
        return EnsembleMemory(tuple(d.put(rows, s) for d, s in zip(self.parts, src.parts, strict=True)))


class EnsembleEngine:
    """Search over the mean log-probabilities of several engines. Search only (no ``forward`` or
    ``loss``): training, and the teacher-forced pass that attention diagnostics need, belong to
    single models."""

    name = "ensemble"

    def __init__(self, engines: list[Engine]) -> None:
        if len(engines) < 2:
            raise ValueError("an ensemble needs at least two models")
        vocab = {e.model.output_layer.out_features for e in engines}
        if len(vocab) != 1:
            raise ValueError(f"the models' target vocabularies differ in size ({sorted(vocab)})")
        self.engines = engines
        self.model = engines[0].model  # search reads the vocabulary size (and calls .eval()) here

    def paths(self) -> dict[str, str]:
        return {f"member {i + 1}": f"{e.model.description} ({e.name})" for i, e in enumerate(self.engines)}

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor, src_mask: torch.Tensor) -> EncodedSource:
        encoded = [e.encode(src, src_lengths, src_mask) for e in self.engines]
        return EncodedSource(EnsembleMemory(tuple(x.memory for x in encoded)),
                             EnsembleState(tuple(x.state for x in encoded)))

    def search_weights(self) -> tuple:
        return tuple(e.search_weights() for e in self.engines)

    def decode_step(self, prev_tokens: torch.Tensor, state: EnsembleState, memory: EnsembleMemory,
                    weights: tuple) -> StepOutput:
        outs = [e.decode_step(prev_tokens, s, m, w)
                for e, s, m, w in zip(self.engines, state.parts, memory.parts, weights, strict=True)]
        mean = torch.stack([F.log_softmax(o.logits.float(), dim=-1) for o in outs]).mean(0)
        return StepOutput(mean.log_softmax(dim=-1), EnsembleState(tuple(o.state for o in outs)), None)

    @contextlib.contextmanager
    def search_scope(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for e in self.engines:
                stack.enter_context(e.search_scope())
            yield
