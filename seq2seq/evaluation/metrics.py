"""Corpus metrics, BLEU by source-sentence length, and bootstrap confidence intervals.

Scores are sacreBLEU's BLEU and chrF with their defaults (13a tokenization, cased, one
reference), computed on detokenized hypotheses against the raw references, so every number
matches ``sacrebleu.corpus_bleu`` / ``corpus_chrf`` and the ``sacrebleu`` command line exactly.

Bootstrap resampling works on sufficient statistics: sacreBLEU's own per-sentence statistics
(BLEU: hyp/ref lengths and n-gram matches/totals for n=1..4; chrF: hyp/ref/match counts per
character n-gram order) are extracted once, each resample is a sum of rows (a count matrix times
the statistics matrix), and the score of a resample comes from sacreBLEU's own formula on the
summed statistics (``BLEU._compute_score_from_stats`` -> ``BLEU.compute_bleu``,
``CHRF._compute_f_score``). Intervals are percentile intervals.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

log = logging.getLogger(__name__)

# Upper bound on the elements of one (resamples x sentences) count matrix, to bound memory.
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class CorpusScore:
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    hyp_len: int  # BLEU's tokenized lengths
    ref_len: int
    length_ratio: float  # hyp_len / ref_len (0.0 if ref_len == 0)
    # sacreBLEU -lc: the case-insensitive score most papers report; None in reports written before it
    bleu_lc: float | None = None
    bleu_lc_signature: str | None = None


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True)
class BucketScore:
    label: str  # "1-10", "11-20", ..., "61+"
    low: int  # inclusive word count
    high: int | None  # inclusive; None for the open last bucket
    count: int  # sentences in the bucket
    bleu: float | None  # None when the bucket is empty (never 0)
    chrf: float | None
    length_ratio: float | None
    bleu_ci: Interval | None
    chrf_ci: Interval | None


@dataclass(frozen=True)
class PairedResult:
    """BLEU(a) - BLEU(b) with its bootstrap interval and one-sided p-value (see paired_bootstrap)."""

    delta: float
    ci: Interval
    p_value: float


def _ratio(hyp_len: int, ref_len: int) -> float:
    return hyp_len / ref_len if ref_len else 0.0


class _Stats:
    """Per-sentence sufficient statistics of BLEU and chrF for one (hyps, refs) corpus."""

    def __init__(self, hyps: list[str], refs: list[str]) -> None:
        self.bleu_metric = BLEU(force=True)  # see _check_tokenized_periods
        self.chrf_metric = CHRF()
        if not hyps:
            self.bleu = np.zeros((0, 2 + 2 * self.bleu_metric.max_ngram_order), dtype=np.int64)
            self.chrf = np.zeros((0, 3 * self.chrf_metric.order), dtype=np.int64)
            return
        self.bleu = np.asarray(
            self.bleu_metric._extract_corpus_statistics(hyps, [refs]), dtype=np.int64
        )
        self.chrf = np.asarray(
            self.chrf_metric._extract_corpus_statistics(hyps, [refs]), dtype=np.int64
        )

    def bleu_from(self, summed: np.ndarray) -> float:
        # tolist() gives Python ints, the same numbers sacrebleu's sum_of_lists produces.
        return float(self.bleu_metric._compute_score_from_stats(summed.tolist()).score)

    def chrf_from(self, summed: np.ndarray) -> float:
        return float(self.chrf_metric._compute_f_score(summed.tolist()))


def _check_same_length(**seqs: list[str]) -> None:
    lengths = {name: len(seq) for name, seq in seqs.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"line counts differ ({detail}); they must be parallel")


def _check_bootstrap_args(n_boot: int, confidence: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"bootstrap samples must be an integer >= 1, got {n_boot!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap confidence must be in (0, 1), got {confidence!r}")


def _resample_sums(
    stats: list[np.ndarray], n_boot: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Sum of resampled rows for each statistics matrix, shape (n_boot, k) each.

    All matrices share the same resampled sentence indices (drawn as an (n_boot, n) matrix).
    Sums are done in float64, exact for integer counts below 2**53, then rounded back.
    """
    n = stats[0].shape[0]
    out = [np.empty((n_boot, s.shape[1]), dtype=np.int64) for s in stats]
    as_float = [s.astype(np.float64) for s in stats]
    chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(rows, n))
        flat = (idx + (np.arange(rows) * n)[:, None]).ravel()
        counts = np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)
        for dst, mat in zip(out, as_float, strict=True):
            dst[start : start + rows] = np.rint(counts @ mat).astype(np.int64)
    return out


def _percentile_interval(values: np.ndarray, confidence: float) -> Interval:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return Interval(float(low), float(high))


def _check_tokenized_periods(hyps: list[str], refs: list[str]) -> None:
    """Warn when the output ends in tokenized periods (' .') and the references do not.

    sacreBLEU warns whenever 100 hypotheses end in ' .', on every scoring call, even when the
    references are written the same way (the synthetic corpus is): then both sides match and the
    score is right. A real problem is only a mismatch, which is what this looks for; the metrics
    run with ``force=True`` (no change to the score or its signature) so sacreBLEU's own message
    does not repeat on every validation."""
    tokenized_hyps = sum(h.endswith(" .") for h in hyps)
    tokenized_refs = sum(r.endswith(" .") for r in refs)
    if tokenized_hyps >= 100 and tokenized_refs < tokenized_hyps // 2:
        log.warning("%d of %d hypotheses end in a tokenized period (' .') but only %d references "
                    "do: the output looks tokenized and the references do not, which lowers BLEU; "
                    "train on the same (detokenized) form of text as the references",
                    tokenized_hyps, len(hyps), tokenized_refs)


def corpus_score(hyps: list[str], refs: list[str]) -> CorpusScore:
    """sacreBLEU BLEU and chrF (default settings) of ``hyps`` against one raw reference each,
    and the lowercased BLEU (``sacrebleu -lc``), each with its signature."""
    _check_same_length(hyps=hyps, refs=refs)
    if not hyps:
        raise ValueError("cannot score an empty corpus (no hypotheses)")
    _check_tokenized_periods(hyps, refs)
    bleu_metric, chrf_metric, lc_metric = BLEU(force=True), CHRF(), BLEU(lowercase=True, force=True)
    bleu = bleu_metric.corpus_score(hyps, [refs])
    chrf = chrf_metric.corpus_score(hyps, [refs])
    lc = lc_metric.corpus_score(hyps, [refs])
    return CorpusScore(
        bleu=float(bleu.score),
        chrf=float(chrf.score),
        bleu_signature=str(bleu_metric.get_signature()),
        chrf_signature=str(chrf_metric.get_signature()),
        hyp_len=int(bleu.sys_len),
        ref_len=int(bleu.ref_len),
        length_ratio=_ratio(int(bleu.sys_len), int(bleu.ref_len)),
        bleu_lc=float(lc.score),
        bleu_lc_signature=str(lc_metric.get_signature()),
    )


def _check_edges(edges: list[int]) -> None:
    if not edges:
        raise ValueError("length bucket edges must not be empty")
    for e in edges:
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise ValueError(f"length bucket edges must be integers >= 0, got {edges!r}")
    if any(b <= a for a, b in pairwise(edges)):
        raise ValueError(f"length bucket edges must be strictly increasing, got {edges!r}")


def bucket_labels(edges: list[int]) -> list[str]:
    """Labels of the buckets ``[edges[i], edges[i+1]-1]`` and the open ``edges[-1]+``."""
    _check_edges(edges)
    labels = [f"{lo}-{hi - 1}" for lo, hi in pairwise(edges)]
    return labels + [f"{edges[-1]}+"]


def assign_buckets(src_lengths: list[int], edges: list[int]) -> list[int]:
    """Bucket index of each length; lengths below ``edges[0]`` (e.g. 0 words) go to bucket 0."""
    _check_edges(edges)
    out = []
    for n in src_lengths:
        if n < 0:
            raise ValueError(f"source lengths must be >= 0, got {n}")
        out.append(max(0, bisect.bisect_right(edges, n) - 1))
    return out


def source_length(line: str) -> int:
    """Length in words: whitespace-separated tokens of the raw source line."""
    return len(line.split())


def bleu_by_length(
    srcs: list[str],
    hyps: list[str],
    refs: list[str],
    edges: list[int],
    n_boot: int = 1000,
    seed: int = 12345,
    confidence: float = 0.95,
) -> list[BucketScore]:
    """BLEU, chrF and length ratio per source-length bucket, with bootstrap intervals.

    Sentences are resampled with replacement within each bucket. Bucket ``i`` draws from
    ``np.random.default_rng([seed, i])``, so its interval depends only on the seed, its index and
    its own sentences. The point estimate of a bucket equals ``sacrebleu.corpus_bleu`` on that
    bucket's sentences; an empty bucket has count 0 and None for every score.
    """
    _check_same_length(srcs=srcs, hyps=hyps, refs=refs)
    _check_bootstrap_args(n_boot, confidence)
    labels = bucket_labels(edges)
    assignment = np.asarray(assign_buckets([source_length(s) for s in srcs], edges), dtype=int)
    stats = _Stats(hyps, refs)

    result = []
    for b, label in enumerate(labels):
        low = edges[b]
        high = edges[b + 1] - 1 if b + 1 < len(edges) else None
        members = np.flatnonzero(assignment == b)
        if members.size == 0:
            result.append(BucketScore(label, low, high, 0, None, None, None, None, None))
            continue
        bleu_rows, chrf_rows = stats.bleu[members], stats.chrf[members]
        bleu_sum = bleu_rows.sum(axis=0)
        rng = np.random.default_rng([seed, b])
        boot_bleu, boot_chrf = _resample_sums([bleu_rows, chrf_rows], n_boot, rng)
        bleu_scores = np.array([stats.bleu_from(row) for row in boot_bleu])
        chrf_scores = np.array([stats.chrf_from(row) for row in boot_chrf])
        result.append(
            BucketScore(
                label=label,
                low=low,
                high=high,
                count=int(members.size),
                bleu=stats.bleu_from(bleu_sum),
                chrf=stats.chrf_from(chrf_rows.sum(axis=0)),
                length_ratio=_ratio(int(bleu_sum[0]), int(bleu_sum[1])),
                bleu_ci=_percentile_interval(bleu_scores, confidence),
                chrf_ci=_percentile_interval(chrf_scores, confidence),
            )
        )
    return result


def paired_bootstrap(
    hyps_a: list[str],
    hyps_b: list[str],
    refs: list[str],
    n_boot: int = 1000,
    seed: int = 12345,
    confidence: float = 0.95,
) -> PairedResult:
    """Paired bootstrap test of BLEU(a) - BLEU(b) on the same sentences.

    Both systems are scored on the same resampled sentence indices (``default_rng(seed)``).
    ``ci`` is the percentile interval of the resampled deltas. ``p_value`` is a one-sided test in
    the direction of the observed delta: the fraction of resamples whose delta is zero or has the
    opposite sign (delta_i <= 0 when delta > 0, delta_i >= 0 when delta < 0). When the observed
    delta is exactly 0 there is no direction to test and ``p_value`` is defined as 1.0.
    """
    _check_same_length(hyps_a=hyps_a, hyps_b=hyps_b, refs=refs)
    _check_bootstrap_args(n_boot, confidence)
    if not refs:
        raise ValueError("cannot compare systems on an empty corpus")
    stats_a, stats_b = _Stats(hyps_a, refs), _Stats(hyps_b, refs)
    return _paired(stats_a, stats_a.bleu, stats_b.bleu, n_boot, np.random.default_rng(seed), confidence)


def paired_bootstrap_by_length(
    srcs: list[str],
    hyps_a: list[str],
    hyps_b: list[str],
    refs: list[str],
    edges: list[int],
    n_boot: int = 1000,
    seed: int = 12345,
    confidence: float = 0.95,
) -> list[PairedResult | None]:
    """``paired_bootstrap`` within each source-length bucket (None for an empty bucket).

    Where the bottleneck shows, the question is per bucket: is attention's lead among the
    51-60-word sentences real, or noise of a few dozen sentences? Bucket ``i`` resamples its own
    sentences with ``default_rng([seed, i])``, as ``bleu_by_length`` does.
    """
    _check_same_length(srcs=srcs, hyps_a=hyps_a, hyps_b=hyps_b, refs=refs)
    _check_bootstrap_args(n_boot, confidence)
    assignment = np.asarray(assign_buckets([source_length(s) for s in srcs], edges), dtype=int)
    stats_a, stats_b = _Stats(hyps_a, refs), _Stats(hyps_b, refs)
    out: list[PairedResult | None] = []
    for b in range(len(bucket_labels(edges))):
        members = np.flatnonzero(assignment == b)
        out.append(None if members.size == 0 else _paired(
            stats_a, stats_a.bleu[members], stats_b.bleu[members], n_boot,
            np.random.default_rng([seed, b]), confidence))
    return out


def _paired(stats: _Stats, rows_a: np.ndarray, rows_b: np.ndarray, n_boot: int, rng: np.random.Generator,
            confidence: float) -> PairedResult:
    """BLEU(rows_a) - BLEU(rows_b) and its bootstrap over the same resampled rows of both."""
    delta = stats.bleu_from(rows_a.sum(axis=0)) - stats.bleu_from(rows_b.sum(axis=0))
    boot_a, boot_b = _resample_sums([rows_a, rows_b], n_boot, rng)
    deltas = np.array([stats.bleu_from(ra) - stats.bleu_from(rb) for ra, rb in zip(boot_a, boot_b, strict=True)])
    if delta > 0:
        p_value = float(np.mean(deltas <= 0))
    elif delta < 0:
        p_value = float(np.mean(deltas >= 0))
    else:
        p_value = 1.0
    return PairedResult(delta=float(delta), ci=_percentile_interval(deltas, confidence), p_value=p_value)
