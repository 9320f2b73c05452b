"""What greedy and beam search share: hypotheses, length caps, the length penalty, compaction
of finished rows, and the checks and labels of search settings.

Both searches (``seq2seq.search.continuous``) stop a sentence when its best-scoring candidate
ends the sentence (so beam size 1 is exactly greedy decoding) or when it reaches its length cap;
beam search returns the finished hypothesis with the best length-normalised score,
lp(n) = ((5 + n) / 6) ** alpha (Wu et al. 2016).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from seq2seq.core.config import SearchConfig
from seq2seq.core.errors import ConfigError


class Hypothesis(NamedTuple):
    tokens: list[int]  # without BOS/EOS
    # log-probability (normalised by the length penalty for beam search); None from greedy
    # decoding asked not to score (``translate_ids``' default: the output needs only the tokens)
    score: float | None
    attention: torch.Tensor | None  # (len(tokens) + 1, S_i) weights per output step incl. EOS
    # with search.nbest > 1: the nbest best finished hypotheses, best first, as (tokens, score);
    # the first is this one
    nbest: list[tuple[list[int], float]] | None = None


def max_lengths(src_lengths: torch.Tensor, cfg: SearchConfig, cap: int) -> torch.Tensor:
    """Per-sentence output cap: ratio x source tokens + offset, never above ``cap``."""
    lengths = torch.ceil(src_lengths.double() * cfg.max_len_ratio).long() + cfg.max_len_offset
    return lengths.clamp(min=1, max=cap)


def check_search_config(cfg: SearchConfig) -> None:
    """Reject search settings that would crash or never end, naming the key."""
    for key, value in (("search.beam_size", cfg.beam_size), ("search.batch_size", cfg.batch_size)):
        if value < 1:
            raise ConfigError(f"{key} must be a positive integer (got {value})")
    if not (math.isfinite(cfg.max_len_ratio) and cfg.max_len_ratio > 0):
        raise ConfigError(f"search.max_len_ratio must be a positive number (got {cfg.max_len_ratio})")
    if cfg.max_len_offset < 0:
        raise ConfigError(f"search.max_len_offset must be 0 or more (got {cfg.max_len_offset})")
    if cfg.nbest < 1:
        raise ConfigError(f"search.nbest must be a positive integer (got {cfg.nbest})")
    if cfg.nbest > cfg.beam_size:
        raise ConfigError(f"search.nbest={cfg.nbest} needs a beam at least as wide: add search=beam "
                          f"search.beam_size={max(cfg.nbest, 5)}")
    if not math.isfinite(cfg.length_penalty):
        raise ConfigError(f"search.length_penalty must be a finite number (got {cfg.length_penalty})")


def length_penalty(length: torch.Tensor | int, alpha: float) -> torch.Tensor | float:
    return ((5.0 + length) / 6.0) ** alpha


SOURCE_MULTIPLE = 8  # source width of a search batch rounded up to this (fewer matmul shapes)
SENTENCE_MULTIPLE = 8  # decoded sentences are compacted to a multiple of this many


def compact_to(done: int, active: int) -> int:
    """How many of ``active`` decoded sentences to keep once ``done`` of them are finished:
    ``active`` (no compaction) until a quarter are finished, when the index_select of the state
    and memory costs less than the output layer and attention spent on finished rows. The count
    is rounded up to a multiple of SENTENCE_MULTIPLE (finished sentences ride along), so that the
    per-step matmuls meet a few batch sizes rather than a new one at every compaction: on the
    CPU each new bf16 shape costs a oneDNN kernel build (seq2seq/kernels/shapes.py)."""
    if done == 0 or 4 * done < active:
        return active
    return min(active, -(-(active - done) // SENTENCE_MULTIPLE) * SENTENCE_MULTIPLE)


def kept_rows(finished: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of ``count`` rows: every unfinished one first, then finished ones to fill up,
    in their original order."""
    order = torch.argsort(finished.to(torch.uint8), stable=True)  # unfinished (0) first
    return order[:count].sort().values


def search_label(cfg: SearchConfig) -> str:
    """Short name of a search setting for directory names: ``greedy`` or ``beam5``."""
    if cfg.beam_size <= 1:
        return "greedy"
    alpha = "" if math.isclose(cfg.length_penalty, 1.0) else f"-lp{cfg.length_penalty:g}"
    return f"beam{cfg.beam_size}{alpha}"
