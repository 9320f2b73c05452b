"""Attention diagnostics on matrices whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from seq2seq.evaluation.attention_stats import AttentionDiagnostics, diagnose
from seq2seq.evaluation.report import EvalReport

EDGES = [1, 11, 21]


def one(weights: torch.Tensor, pad: float = 0.0, words: int = 5):
    return diagnose([weights], [pad], [" ".join(["w"] * words)], EDGES).overall


def test_a_hard_diagonal_is_sharp_monotone_and_covers_each_piece_once():
    s = one(torch.eye(6))
    assert s.entropy == pytest.approx(0.0, abs=1e-9)
    assert s.monotonicity == 1.0 and s.coverage_deviation == pytest.approx(0.0, abs=1e-12)
    assert s.pad_mass == 0.0 and s.sentences == 1


def test_reading_right_to_left_is_not_monotone():
    assert one(torch.eye(5).flip(0)).monotonicity == 0.0
    zigzag = torch.eye(4)[[0, 2, 1, 3]]  # one step back out of three moves
    assert one(zigzag).monotonicity == pytest.approx(2 / 3)


def test_uniform_attention_has_the_entropy_of_the_uniform_distribution():
    assert one(torch.full((3, 8), 1 / 8)).entropy == pytest.approx(math.log(8))


def test_coverage_deviation_counts_over_and_under_translation():
    # 4 steps all on piece 0 of 4: piece 0 gets 4 (off by 3), the others 0 (off by 1 each).
    w = torch.zeros(4, 4)
    w[:, 0] = 1.0
    assert one(w).coverage_deviation == pytest.approx((3 + 1 + 1 + 1) / 4)


def test_pad_mass_is_the_largest_measured_and_buckets_follow_source_words():
    w = torch.eye(3)
    d = diagnose([w, w, w], [0.0, 0.25, 0.0], ["a b", "a " * 15, "a " * 30], EDGES)
    assert d.overall.pad_mass == 0.25 and d.overall.sentences == 3
    assert [(k, v.sentences) for k, v in d.buckets.items()] == [("1-10", 1), ("11-20", 1), ("21+", 1)]
    assert d.buckets["11-20"].pad_mass == 0.25 and d.buckets["1-10"].pad_mass == 0.0


def test_an_empty_bucket_has_no_figures_and_the_dict_round_trips():
    d = diagnose([torch.eye(2)], [0.0], ["a b"], EDGES)
    assert d.buckets["21+"].sentences == 0 and d.buckets["21+"].entropy is None
    assert AttentionDiagnostics.from_dict(d.to_dict()) == d


def test_report_json_keeps_the_diagnostics_and_reads_reports_without_them():
    from seq2seq.evaluation.metrics import CorpusScore

    score = CorpusScore(bleu=1.0, chrf=2.0, bleu_signature="b", chrf_signature="c", hyp_len=1, ref_len=1,
                        length_ratio=1.0)
    base = dict(corpus="c", split="test", src_lang="de", tgt_lang="en", model="bahdanau", checkpoint="x",
                search={}, score=score, buckets=[], num_sentences=1, bootstrap={}, created="now")
    diag = diagnose([torch.eye(2)], [0.0], ["a b"], EDGES).to_dict()
    with_attention = EvalReport(**base, attention=diag)
    assert EvalReport.from_dict(with_attention.to_dict()) == with_attention
    plain = EvalReport(**base)
    assert "attention" not in plain.to_dict() and EvalReport.from_dict(plain.to_dict()).attention is None
