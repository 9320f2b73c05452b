"""Metrics: exact agreement with sacreBLEU, length buckets, bootstrap intervals, paired test."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import sacrebleu

from seq2seq.evaluation import metrics
from seq2seq.evaluation.metrics import (
    Interval,
    assign_buckets,
    bleu_by_length,
    bucket_labels,
    corpus_score,
    paired_bootstrap,
    paired_bootstrap_by_length,
    source_length,
)

EDGES = [1, 11, 21, 31, 41, 51, 61]

REFS = [
    "The cat sat on the mat.",
    "Hello world, how are you?",
    'It\'s a "quoted" phrase -- with punctuation!',
    "Prices rose by 3.5% in 2014.",
]
HYPS = [
    "The cat sat on a mat.",
    "Hello world, how are you today?",
    'It is a "quoted" phrase with punctuation!',
    "Prices rose 3.5% in 2014.",
]


def _words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def _corpus(n: int = 60, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """Sources of varied length with noisy hypotheses (a non-degenerate BLEU)."""
    rng = np.random.default_rng(seed)
    vocab = [f"v{i}" for i in range(50)]
    srcs, hyps, refs = [], [], []
    for _ in range(n):
        length = int(rng.integers(1, 30))
        ref = [vocab[j] for j in rng.integers(0, 50, size=length + 2)]
        hyp = [t if rng.random() < 0.7 else vocab[int(rng.integers(0, 50))] for t in ref]
        srcs.append(_words(length))
        refs.append(" ".join(ref))
        hyps.append(" ".join(hyp))
    return srcs, hyps, refs


# --- corpus score -------------------------------------------------------------------------------


def test_corpus_score_equals_sacrebleu_api():
    s = corpus_score(HYPS, REFS)
    bleu = sacrebleu.corpus_bleu(HYPS, [REFS])
    assert s.bleu == bleu.score
    assert s.chrf == sacrebleu.corpus_chrf(HYPS, [REFS]).score
    assert (s.hyp_len, s.ref_len) == (bleu.sys_len, bleu.ref_len)
    assert s.length_ratio == bleu.sys_len / bleu.ref_len
    for sig in (s.bleu_signature, s.chrf_signature):
        assert "nrefs:1" in sig
    assert "tok:13a" in s.bleu_signature
    assert "case:mixed" in s.bleu_signature


def test_corpus_score_equals_sacrebleu_cli(tmp_path):
    ref, hyp = tmp_path / "ref.txt", tmp_path / "hyp.txt"
    ref.write_text("".join(r + "\n" for r in REFS), encoding="utf-8")
    hyp.write_text("".join(h + "\n" for h in HYPS), encoding="utf-8")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sacrebleu",
            str(ref),
            "-i",
            str(hyp),
            "-b",
            "-m",
            "bleu",
            "-w",
            "6",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(out.stdout.strip()) == round(corpus_score(HYPS, REFS).bleu, 6)
    lowercased = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-b", "-m", "bleu",
                                 "-w", "6", "-lc"], capture_output=True, text=True, check=True)
    assert float(lowercased.stdout.strip()) == round(corpus_score(HYPS, REFS).bleu_lc, 6)


def test_lowercased_bleu_ignores_case_only():
    refs = ["The cat sat on the mat .", "A dog runs in the Park ."]
    shouted = [r.upper() for r in refs]
    s = corpus_score(shouted, refs)
    assert s.bleu_lc == pytest.approx(100.0) and s.bleu < 10.0
    assert s.bleu_lc == sacrebleu.corpus_bleu(shouted, [refs], lowercase=True).score
    assert "case:lc" in s.bleu_lc_signature and "case:mixed" in s.bleu_signature


def test_tokenized_periods_warn_only_on_a_mismatch(caplog):
    """Hypotheses and references both ending in ' .' (the synthetic corpus) score without a
    warning, from sacreBLEU or us, and with the score sacreBLEU gives; tokenized output against
    detokenized references is warned about, once, with the counts."""
    rng = np.random.default_rng(0)
    words = ["a", "b", "c", "d", "e"]
    refs = [" ".join(rng.choice(words, size=6)) + " ." for _ in range(150)]
    hyps = [r if i % 3 else "x " + r for i, r in enumerate(refs)]
    with caplog.at_level("WARNING"):
        s = corpus_score(hyps, refs)
    assert caplog.records == []
    assert s.bleu == sacrebleu.corpus_bleu(hyps, [refs]).score
    caplog.clear()
    detok_refs = [r[:-2] + "." for r in refs]
    with caplog.at_level("WARNING"):
        corpus_score(hyps, detok_refs)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "150 of 150 hypotheses end in a tokenized period" in messages[0]
    assert "only 0 references" in messages[0]


def test_corpus_score_validates():
    with pytest.raises(ValueError, match="differ"):
        corpus_score(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        corpus_score([], [])


# --- buckets ------------------------------------------------------------------------------------


def test_bucket_labels():
    assert bucket_labels([1, 11, 21]) == ["1-10", "11-20", "21+"]
    assert bucket_labels(EDGES) == ["1-10", "11-20", "21-30", "31-40", "41-50", "51-60", "61+"]
    assert bucket_labels([0]) == ["0+"]


def test_assign_buckets_boundaries():
    lengths = [0, 1, 10, 11, 20, 21, 60, 61, 200]
    assert assign_buckets(lengths, EDGES) == [0, 0, 0, 1, 1, 2, 5, 6, 6]
    assert assign_buckets([], EDGES) == []


def test_source_length_counts_whitespace_tokens():
    assert source_length("") == 0
    assert source_length("   ") == 0
    assert source_length(" Hello,  world!\tyes\n") == 3


@pytest.mark.parametrize("edges", [[], [1, 1], [5, 3], [-1, 4], [1.5, 3]])
def test_bad_edges(edges):
    with pytest.raises(ValueError, match="edges"):
        bucket_labels(edges)
    with pytest.raises(ValueError, match="edges"):
        bleu_by_length(["a"], ["a"], ["a"], edges)


def test_bleu_by_length_validates():
    with pytest.raises(ValueError, match="differ"):
        bleu_by_length(["a", "b"], ["a"], ["a", "b"], EDGES)
    with pytest.raises(ValueError, match="samples"):
        bleu_by_length(["a"], ["a"], ["a"], EDGES, n_boot=0)
    with pytest.raises(ValueError, match="confidence"):
        bleu_by_length(["a"], ["a"], ["a"], EDGES, confidence=1.0)


# --- bleu_by_length -----------------------------------------------------------------------------


def test_point_estimates_equal_sacrebleu_on_subsets():
    srcs, hyps, refs = _corpus()
    srcs.append("")  # an empty source line goes to the first bucket
    hyps.append("v1 v2 v3")
    refs.append("v1 v2 v4")
    result = bleu_by_length(srcs, hyps, refs, [1, 11, 21, 61], n_boot=200)
    assign = assign_buckets([source_length(s) for s in srcs], [1, 11, 21, 61])
    assert [b.label for b in result] == ["1-10", "11-20", "21-60", "61+"]
    assert [(b.low, b.high) for b in result] == [(1, 10), (11, 20), (21, 60), (61, None)]
    assert sum(b.count for b in result) == len(srcs)
    for i, b in enumerate(result[:3]):
        idx = [j for j, a in enumerate(assign) if a == i]
        sub_h, sub_r = [hyps[j] for j in idx], [refs[j] for j in idx]
        bleu = sacrebleu.corpus_bleu(sub_h, [sub_r])
        assert b.count == len(idx) > 1
        assert b.bleu == bleu.score
        assert b.chrf == sacrebleu.corpus_chrf(sub_h, [sub_r]).score
        assert b.length_ratio == bleu.sys_len / bleu.ref_len
        assert 0 < b.bleu < 100
        assert b.bleu_ci.low <= b.bleu <= b.bleu_ci.high
        assert b.bleu_ci.low < b.bleu_ci.high
        assert b.chrf_ci.low <= b.chrf <= b.chrf_ci.high
    empty = result[3]
    assert empty.count == 0
    assert empty.bleu is None and empty.chrf is None and empty.length_ratio is None
    assert empty.bleu_ci is None and empty.chrf_ci is None


def test_identical_hyps_give_100_with_collapsed_ci():
    refs = [_words(n) for n in (5, 8, 12, 15, 30)]
    result = bleu_by_length(refs, refs, refs, [1, 11, 21], n_boot=100)
    for b in result:
        assert b.count > 0
        assert b.bleu == pytest.approx(100.0)
        assert b.chrf == pytest.approx(100.0)
        assert (b.bleu_ci.low, b.bleu_ci.high) == (pytest.approx(100.0), pytest.approx(100.0))
        assert b.length_ratio == 1.0


def test_seed_determinism_and_sensitivity():
    srcs, hyps, refs = _corpus()
    a = bleu_by_length(srcs, hyps, refs, EDGES, n_boot=300, seed=7)
    b = bleu_by_length(srcs, hyps, refs, EDGES, n_boot=300, seed=7)
    c = bleu_by_length(srcs, hyps, refs, EDGES, n_boot=300, seed=8)
    assert a == b
    assert [x.bleu for x in a] == [x.bleu for x in c]
    assert [x.bleu_ci for x in a if x.count] != [x.bleu_ci for x in c if x.count]


def test_bucket_interval_independent_of_other_buckets():
    srcs, hyps, refs = _corpus()
    full = bleu_by_length(srcs, hyps, refs, [1, 11, 21], n_boot=200)
    keep = [i for i, s in enumerate(srcs) if source_length(s) >= 11]
    part = bleu_by_length(
        [srcs[i] for i in keep],
        [hyps[i] for i in keep],
        [refs[i] for i in keep],
        [1, 11, 21],
        n_boot=200,
    )
    assert part[0].count == 0
    assert part[1:] == full[1:]


def test_single_sentence_bucket_ci_collapses_to_point():
    result = bleu_by_length(
        [_words(3)], ["the cat sat on the mat"], ["the cat sat on a mat"], [1], n_boot=50
    )
    b = result[0]
    assert b.count == 1
    assert (
        b.bleu
        == sacrebleu.corpus_bleu(["the cat sat on the mat"], [["the cat sat on a mat"]]).score
    )
    assert b.bleu_ci == Interval(b.bleu, b.bleu)
    assert b.chrf_ci == Interval(b.chrf, b.chrf)


def test_two_sentence_bucket_resample_distribution():
    """A perfect sentence A and a hopeless one B: resamples are AA (p=1/4) -> 100,
    AB/BA (p=1/2) -> the point estimate, BB (p=1/4) -> 0. The 2.5th percentile therefore lies in
    the BB mass (0) and the 97.5th in the AA mass (100)."""
    hyps = ["a b c d e f", "u v w x y z"]
    refs = ["a b c d e f", "g h i j k l"]
    stats = metrics._Stats(hyps, refs)
    rng = np.random.default_rng(0)
    (sums,) = metrics._resample_sums([stats.bleu], 4000, rng)
    scores = np.array([stats.bleu_from(r) for r in sums])
    point = sacrebleu.corpus_bleu(hyps, [refs]).score
    values, counts = np.unique(np.round(scores, 9), return_counts=True)
    assert values.tolist() == [0.0, round(point, 9), 100.0]
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.03)

    (b,) = bleu_by_length(["x"] * 2, hyps, refs, [1], n_boot=1000)
    assert b.bleu == point
    assert b.bleu_ci.low == 0.0
    assert b.bleu_ci.high == pytest.approx(100.0)


def test_percentile_interval_hand_checked():
    values = np.arange(101, dtype=float)  # percentiles are the values themselves
    ci = metrics._percentile_interval(values, 0.95)
    assert (ci.low, ci.high) == (pytest.approx(2.5), pytest.approx(97.5))
    ci = metrics._percentile_interval(values, 0.5)
    assert (ci.low, ci.high) == (pytest.approx(25.0), pytest.approx(75.0))


def test_resample_sums_match_explicit_indexing():
    stats = np.arange(12, dtype=np.int64).reshape(4, 3)
    (sums,) = metrics._resample_sums([stats], 5, np.random.default_rng(3))
    idx = np.random.default_rng(3).integers(0, 4, size=(5, 4))
    np.testing.assert_array_equal(sums, stats[idx].sum(axis=1))


def test_resample_sums_chunked(monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 7)  # one resample per chunk
    stats = np.arange(12, dtype=np.int64).reshape(4, 3)
    (sums,) = metrics._resample_sums([stats], 5, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    idx = np.vstack([rng.integers(0, 4, size=(1, 4)) for _ in range(5)])
    np.testing.assert_array_equal(sums, stats[idx].sum(axis=1))


# --- paired bootstrap ---------------------------------------------------------------------------


def test_paired_bootstrap_identical_systems():
    _, hyps, refs = _corpus()
    res = paired_bootstrap(hyps, hyps, refs, n_boot=200)
    assert res.delta == 0.0
    assert res.p_value == 1.0
    assert res.ci == Interval(0.0, 0.0)


def test_paired_bootstrap_clearly_better_system():
    _, hyps, refs = _corpus()
    worse = [" ".join(h.split()[::-1]) for h in hyps]  # reversed word order: few n-gram matches
    res = paired_bootstrap(hyps, worse, refs, n_boot=300)
    assert res.delta > 0
    assert res.p_value < 0.05
    assert res.ci.low > 0
    rev = paired_bootstrap(worse, hyps, refs, n_boot=300)
    assert rev.delta == pytest.approx(-res.delta)
    assert rev.p_value < 0.05
    assert rev.ci.high < 0


def test_paired_bootstrap_deterministic_and_validates():
    _, hyps, refs = _corpus()
    noisy = hyps[1:] + hyps[:1]
    assert paired_bootstrap(hyps, noisy, refs, n_boot=100, seed=1) == paired_bootstrap(
        hyps, noisy, refs, n_boot=100, seed=1
    )
    with pytest.raises(ValueError, match="differ"):
        paired_bootstrap(hyps, hyps[:-1], refs)
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap([], [], [])


def test_paired_bootstrap_by_length_tests_each_bucket_on_its_own_sentences():
    srcs, hyps, refs = _corpus(n=90)
    edges = [1, 11, 21, 100]
    buckets = assign_buckets([source_length(s) for s in srcs], edges)
    # b equals a on the short sentences and is garbled on the long ones
    garbled = [h if buckets[i] == 0 else " ".join(h.split()[::-1]) for i, h in enumerate(hyps)]
    res = paired_bootstrap_by_length(srcs, hyps, garbled, refs, edges, n_boot=300, seed=3)
    assert len(res) == 4 and res[3] is None  # no source of 100+ words
    assert res[0].delta == 0.0 and res[0].p_value == 1.0
    for b in (1, 2):
        members = [i for i, k in enumerate(buckets) if k == b]
        alone = paired_bootstrap([hyps[i] for i in members], [garbled[i] for i in members],
                                 [refs[i] for i in members], n_boot=300)
        assert res[b].delta == pytest.approx(alone.delta)  # the bucket's own corpus BLEU difference
        assert res[b].delta > 0 and res[b].ci.low > 0 and res[b].p_value < 0.05
    assert res == paired_bootstrap_by_length(srcs, hyps, garbled, refs, edges, n_boot=300, seed=3)
    with pytest.raises(ValueError, match="differ"):
        paired_bootstrap_by_length(srcs[:-1], hyps, garbled, refs, edges)
