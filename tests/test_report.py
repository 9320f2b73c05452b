"""Evaluation report files: JSON round trip and schema, markdown/plot/hyps outputs, no overwrite."""

from __future__ import annotations

import json

import pytest

from seq2seq.evaluation.metrics import BucketScore, Interval, bleu_by_length, corpus_score
from seq2seq.evaluation.report import (
    EvalReport,
    format_summary,
    plot_bleu_by_length,
    unique_dir,
    write_report,
)

SRCS = ["a b c", "one two three four five six seven eight nine ten eleven twelve", ""]
REFS = ["The cat sat on the mat.", "Hello world, how are you today?", "Yes."]
HYPS = ["The cat sat on a mat.", "Hello world, how are you?", "Yes."]
EDGES = [1, 11, 21]

TOP_KEYS = {
    "schema_version",
    "corpus",
    "split",
    "src_lang",
    "tgt_lang",
    "model",
    "checkpoint",
    "search",
    "num_sentences",
    "created",
    "score",
    "bootstrap",
    "buckets",
}
SCORE_KEYS = {
    "bleu",
    "bleu_lc",
    "bleu_lc_signature",
    "chrf",
    "bleu_signature",
    "chrf_signature",
    "hyp_len",
    "ref_len",
    "length_ratio",
}
BUCKET_KEYS = {
    "label",
    "low",
    "high",
    "count",
    "bleu",
    "chrf",
    "length_ratio",
    "bleu_ci",
    "chrf_ci",
}


@pytest.fixture(scope="module")
def report() -> EvalReport:
    return EvalReport(
        corpus="toy",
        split="test",
        src_lang="en",
        tgt_lang="fr",
        model="bahdanau",
        checkpoint="outputs/run/checkpoints/best.pt",
        search={"beam_size": 5, "length_penalty": 1.0, "max_len_ratio": 2.0},
        score=corpus_score(HYPS, REFS),
        buckets=bleu_by_length(SRCS, HYPS, REFS, EDGES, n_boot=50, seed=1),
        num_sentences=len(HYPS),
        bootstrap={"samples": 50, "seed": 1, "confidence": 0.95},
        created="2024-05-01T12:00:00+00:00",
    )


def test_round_trip(report):
    d = report.to_dict()
    assert EvalReport.from_dict(d) == report
    assert EvalReport.from_dict(json.loads(json.dumps(d))) == report


def test_schema_keys(report):
    d = report.to_dict()
    assert set(d) == TOP_KEYS
    assert d["schema_version"] == 1
    assert set(d["score"]) == SCORE_KEYS
    assert [b["label"] for b in d["buckets"]] == ["1-10", "11-20", "21+"]
    for b in d["buckets"]:
        assert set(b) == BUCKET_KEYS
    full, _, empty = d["buckets"]
    assert set(full["bleu_ci"]) == {"low", "high"}
    assert empty["count"] == 0 and empty["bleu"] is None and empty["bleu_ci"] is None
    assert empty["high"] is None


def test_reports_written_before_the_lowercased_score_still_load(report):
    d = report.to_dict()
    assert d["score"]["bleu_lc"] is not None and "case:lc" in d["score"]["bleu_lc_signature"]
    del d["score"]["bleu_lc"], d["score"]["bleu_lc_signature"]
    old = EvalReport.from_dict(d)
    assert old.score.bleu_lc is None and old.score.bleu == report.score.bleu


def test_from_dict_rejects_other_versions(report):
    d = report.to_dict()
    with pytest.raises(ValueError, match="schema_version"):
        EvalReport.from_dict({**d, "schema_version": 2})
    del d["score"]
    with pytest.raises(ValueError, match="malformed"):
        EvalReport.from_dict(d)


def test_write_report_files(report, tmp_path):
    out = tmp_path / "eval"
    assert write_report(report, out, HYPS) == out
    assert sorted(p.name for p in out.iterdir()) == [
        "bleu_by_length.png",
        "hyps.txt",
        "report.json",
        "report.md",
    ]
    hyps_text = (out / "hyps.txt").read_text(encoding="utf-8")
    assert hyps_text.endswith("\n")
    assert hyps_text.splitlines() == HYPS
    loaded = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert EvalReport.from_dict(loaded) == report
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| 1-10 | 2 |" in md
    assert "| 21+ | 0 | empty | — | — |" in md
    assert "95% CI" in md
    assert report.score.bleu_signature in md
    assert (out / "bleu_by_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_into_empty_existing_dir(report, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    write_report(report, out, HYPS)
    assert (out / "report.json").is_file()


def test_write_report_never_overwrites(report, tmp_path):
    out = tmp_path / "eval"
    write_report(report, out, HYPS)
    before = (out / "report.json").read_bytes()
    with pytest.raises(FileExistsError, match="refusing"):
        write_report(report, out, HYPS)
    assert (out / "report.json").read_bytes() == before
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError):
        write_report(report, a_file, HYPS)


def test_write_report_validates_hyps(report, tmp_path):
    with pytest.raises(ValueError, match="hypotheses"):
        write_report(report, tmp_path / "a", HYPS[:-1])
    with pytest.raises(ValueError, match="line break"):
        write_report(report, tmp_path / "b", ["x", "y\nz", "w"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unique_dir(tmp_path):
    base = tmp_path / "eval"
    assert unique_dir(base) == base
    base.mkdir()
    assert unique_dir(base) == tmp_path / "eval-2"
    (tmp_path / "eval-2").mkdir()
    assert unique_dir(base) == tmp_path / "eval-3"


def test_format_summary(report):
    text = format_summary(report)
    lines = text.splitlines()
    assert any(line.startswith("1-10") and "[" in line for line in lines)
    row_21 = next(line for line in lines if line.startswith("21+"))
    assert "empty" in row_21 and "—" in row_21
    assert f"{report.score.bleu:.2f}" in text
    assert "bahdanau" in text and "toy/test" in text


def test_plot_several_configs_and_empty(tmp_path):
    def bucket(label, low, high, count, bleu):
        ci = Interval(bleu - 2, bleu + 2) if bleu is not None else None
        return BucketScore(label, low, high, count, bleu, bleu, 1.0 if count else None, ci, ci)

    a = [bucket("1-10", 1, 10, 5, 30.0), bucket("11+", 11, None, 0, None)]
    b = [bucket("1-10", 1, 10, 5, 25.0), bucket("11+", 11, None, 3, 20.0)]
    path = tmp_path / "cmp.png"
    plot_bleu_by_length([("a", a), ("b", b)], path, "comparison")
    assert path.read_bytes()[:4] == b"\x89PNG"
    empty = tmp_path / "empty.png"
    plot_bleu_by_length([("a", [bucket("1+", 1, None, 0, None)])], empty, "nothing")
    assert empty.is_file()
    assert not list(tmp_path.glob(".*.tmp"))
