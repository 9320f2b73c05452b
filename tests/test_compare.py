"""seq2seq-compare on constructed run directories: grouping, statistics, refusals, outputs."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from seq2seq import cli
from seq2seq.evaluation.compare import CompareError, build_comparison, run_compare
from seq2seq.evaluation.compare_report import relative_bleu
from seq2seq.evaluation.compare_runs import describe
from seq2seq.evaluation.metrics import BucketScore, CorpusScore, Interval, paired_bootstrap
from seq2seq.evaluation.report import EvalReport

BLEU_SIG = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"
CHRF_SIG = "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0"
LC_SIG = "nrefs:1|case:lc|eff:no|tok:13a|smooth:exp|version:2.6.0"
GREEDY = {"beam_size": 1, "length_penalty": 1.0, "max_len_ratio": 2.0, "max_len_offset": 10}
NOUNS = ["cat", "dog", "bird", "horse", "child", "woman", "man"]
N = 40
REFS = [f"the {NOUNS[i % 7]} number {i} sat on the mat near the {NOUNS[i * 3 % 7]} today ." for i in range(N)]
BAD = [" ".join(r.split()[:5]) + " ." for r in REFS]  # truncated: a poor system


def make_run(root: Path, name: str, *, attention: str = "bahdanau", seed: int = 1, bleu: float = 20.0,
             chrf: float = 50.0, extra: dict | None = None, hyps: list[str] | None = None,
             refs: list[str] | None = REFS, summary: bool = True, finished: bool = True,
             eval_name: str | None = "test", search: dict | None = None, bleu_sig: str = BLEU_SIG,
             train_seconds: float = 100.0, tokens_per_s: float = 1000.0, best_step: int = 500,
             num_parameters: int = 1000, srcs: list[str] | None = None, attention_stats: dict | None = None,
             summary_extra: dict | None = None, speed: dict | None = None) -> Path:
    """A run directory with config, summary.json and one eval report with fabricated scores."""
    run = root / name
    cfg = OmegaConf.create({
        "name": "sweep", "seed": seed,
        "data": {"corpus": "toy", "root": "${oc.env:SEQ2SEQ_DATA,data}", "src_lang": "de",
                 "tgt_lang": "en", "test_splits": ["test"]},
        "model": {"embedding_size": 32, "attention": {"type": attention, "score": "general",
                                                      "input_feeding": True, "hidden_size": 32}},
        "optim": {"lr": 0.001}, "trainer": {"max_steps": 100, "progress": False},
        "search": {"beam_size": 1}, "eval": {"bootstrap_samples": 50},
    })
    cfg = OmegaConf.merge(cfg, extra or {})
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create([f"seed={seed}"]), run / ".hydra" / "overrides.yaml")
    model = describe({"model.attention.type": attention, "model.attention.score": "general",
                      "model.attention.input_feeding": True})
    if summary:
        (run / "summary.json").write_text(json.dumps({
            "model": model, "num_parameters": num_parameters, "best_step": best_step,
            "best_valid_bleu": bleu, "steps": 1000, "train_seconds": train_seconds,
            "train_tokens_per_s": tokens_per_s, "finished": finished, **(summary_extra or {})}))
    if eval_name is None:
        return run
    buckets = [
        BucketScore("1-10", 1, 10, 25, bleu + 5, chrf, 1.0, Interval(bleu + 3, bleu + 7), Interval(chrf - 1, chrf + 1)),
        BucketScore("11-20", 11, 20, 15, bleu - 5, chrf, 1.0, Interval(bleu - 7, bleu - 3), Interval(chrf - 1, chrf + 1)),
        BucketScore("21+", 21, None, 0, None, None, None, None, None),
    ]
    report = EvalReport(
        corpus="toy", split="test", src_lang="de", tgt_lang="en", model=model,
        checkpoint=str(run / "checkpoints" / "best.pt"), search=dict(search or GREEDY),
        score=CorpusScore(bleu, chrf, bleu_sig, CHRF_SIG, 400, 410, 400 / 410, bleu + 1, LC_SIG), buckets=buckets,
        num_sentences=N, bootstrap={"samples": 50, "seed": 1, "confidence": 0.95},
        created="2024-05-01T12:00:00+00:00", attention=attention_stats, speed=speed)
    out = run / "eval" / eval_name
    out.mkdir(parents=True)
    (out / "report.json").write_text(json.dumps(report.to_dict()))
    (out / "hyps.txt").write_text("".join(h + "\n" for h in (hyps or BAD)))
    if refs is not None:
        (out / "refs.txt").write_text("".join(r + "\n" for r in refs))
    if srcs is not None:
        (out / "srcs.txt").write_text("".join(x + "\n" for x in srcs))
    return run


# Sources matching the fabricated buckets: 25 of 1-10 words, 15 of 11-20.
SRCS = [" ".join(["w"] * (1 + i % 10)) for i in range(25)] + [" ".join(["w"] * (11 + i % 10)) for i in range(15)]


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A multirun-like sweep: none x2 seeds, bahdanau x3 seeds, luong x1."""
    root = tmp_path / "multirun" / "2024-05-01_12-00-00"
    make_run(root, "0", attention="none", seed=1, bleu=10.0, train_seconds=60.0)
    make_run(root, "1", attention="none", seed=2, bleu=12.0, train_seconds=120.0)
    make_run(root, "2", attention="bahdanau", seed=1, bleu=20.0, chrf=50.0, best_step=400)
    make_run(root, "3", attention="bahdanau", seed=2, bleu=22.0, chrf=52.0, best_step=500)
    make_run(root, "10", attention="bahdanau", seed=3, bleu=24.0, chrf=54.0, best_step=600)
    make_run(root, "5", attention="luong", seed=1, bleu=15.0, hyps=REFS)
    return root


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("SEQ2SEQ_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["seq2seq-compare", *args])
    code = 0
    try:
        cli.compare()
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_groups_means_and_std_over_seeds(sweep):
    c, paths, table = run_compare([sweep], n_boot=100)
    groups = {g.label: g for g in c.groups}
    assert list(groups) == ["none", "bahdanau", "luong-general-feed"]
    assert [len(g.runs) for g in c.groups] == [2, 3, 1]
    assert [r.seed for r in groups["bahdanau"].runs] == [1, 2, 3]
    m = groups["bahdanau"].metrics
    assert m["bleu"] == pytest.approx((22.0, 2.0))
    assert m["chrf"] == pytest.approx((52.0, 2.0))
    assert m["bleu_len_1-10"] == pytest.approx((27.0, 2.0))
    assert m["bleu_len_21+"] == (None, None)
    assert m["best_step"] == pytest.approx((500.0, 100.0))
    none = groups["none"].metrics
    assert none["bleu"] == pytest.approx((11.0, math.sqrt(2)))
    assert none["train_seconds"] == pytest.approx((90.0, math.sqrt(1800)))
    assert groups["luong-general-feed"].metrics["bleu"] == (15.0, None)
    assert c.baseline == "none"
    assert set(paths) == {"comparison.md", "comparison.csv", "comparison.json", "bleu_by_length.png",
                          "bleu_by_length_relative.png"}
    assert all(p.parent == sweep and p.stat().st_size > 0 for p in paths.values())
    assert "| bahdanau | 3 | 22.00 ± 2.00 | 23.00 ± 2.00 | 52.00 ± 2.00 | 27.00 ± 2.00 | 17.00 ± 2.00 |" in table
    assert "| luong-general-feed | 1 | 15.00 | 16.00 | 50.00 |" in table
    assert "21+" not in table.splitlines()[0]  # an empty bucket gets no column


def test_output_files_and_columns(sweep):
    _, paths, _ = run_compare([sweep], n_boot=50)
    with open(paths["comparison.csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["none", "bahdanau", "luong-general-feed"]
    for col in ("runs", "seeds", "bleu_mean", "bleu_std", "chrf_mean", "bleu_len_1-10_mean",
                "bleu_len_11-20_std", "num_parameters_mean", "train_seconds_mean", "tokens_per_s_mean",
                "best_step_mean", "baseline", "delta_bleu", "delta_ci_low", "delta_ci_high", "p_value"):
        assert col in rows[0], col
    assert rows[1]["seeds"] == "1 2 3" and float(rows[1]["bleu_std"]) == pytest.approx(2.0)
    assert rows[0]["bleu_std"] != "" and rows[2]["bleu_std"] == ""
    doc = json.loads(paths["comparison.json"].read_text())
    assert doc["baseline"] == "none" and doc["test_set"]["num_sentences"] == N
    assert doc["signatures"]["bleu"] == BLEU_SIG and len(doc["runs"]) == 6 and doc["not_compared"] == []
    md = paths["comparison.md"].read_text()
    assert "bleu_by_length_relative.png" in md and "## Runs" in md
    assert "| 2 | bahdanau | 1 | 20.00 |" in md  # run paths relative to the sweep directory
    assert "| luong-general-feed | 1 |" in md and "| < 0.02 |" in md  # p = 0 of 50 resamples
    for p in ("bleu_by_length.png", "bleu_by_length_relative.png"):
        assert paths[p].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_outside_the_output_folder_are_listed_from_the_working_directory(sweep, tmp_path, monkeypatch):
    # Comparing outputs/... into docs/... must not write this machine's absolute paths into the docs.
    monkeypatch.chdir(tmp_path)
    _, paths, _ = run_compare([sweep], out=tmp_path / "docs" / "zoo", n_boot=20)
    md = paths["comparison.md"].read_text()
    assert "| multirun/2024-05-01_12-00-00/2 | bahdanau | 1 | 20.00 |" in md
    assert str(tmp_path) not in md
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # runs neither under --out nor under the working directory: as they are
    _, paths, _ = run_compare([sweep], out=tmp_path / "docs" / "zoo2", n_boot=20)
    assert f"| {sweep / '2'} | bahdanau | 1 |" in paths["comparison.md"].read_text()


def _alignment(aer_short: float, aer_long: float) -> dict:
    """A report's attention section with gold-alignment scores for the 1-10 and 11-20 buckets."""
    return {"sentences": N, "entropy": 0.5, "pad_mass": 0.0, "monotonicity": 0.9, "coverage_deviation": 0.2,
            "alignment": {"sentences": N, "aer": (aer_short + aer_long) / 2, "buckets": [
                {"label": "1-10", "sentences": 25, "aer": aer_short},
                {"label": "11-20", "sentences": 15, "aer": aer_long},
                {"label": "21+", "sentences": 0, "aer": None}]}}


def test_aer_by_length_table_csv_and_plot(tmp_path):
    root = tmp_path / "multirun" / "x"
    make_run(root, "0", attention="none", bleu=10.0)
    make_run(root, "1", attention="luong", seed=1, bleu=20.0, attention_stats=_alignment(0.1, 0.3))
    make_run(root, "2", attention="luong", seed=2, bleu=22.0, attention_stats=_alignment(0.2, 0.5))
    make_run(root, "3", attention="bahdanau", bleu=21.0, attention_stats=_alignment(0.05, 0.1))
    c, paths, _ = run_compare([root], n_boot=0)
    md = paths["comparison.md"].read_text()
    assert "## Alignment error rate by length" in md and "aer_by_length.png" in md
    assert "| config | AER 1-10 (n=25) | AER 11-20 (n=15) |" in md  # the empty bucket gets no column
    assert "| luong-general-feed | 0.150 ± 0.071 | 0.400 ± 0.141 |" in md
    assert "| bahdanau | 0.050 | 0.100 |" in md
    assert "| none | " not in md.split("## Alignment error rate by length")[1].split("## Runs")[0]
    assert paths["aer_by_length.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(paths["comparison.csv"], newline="") as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    assert float(rows["luong-general-feed"]["aer_len_11-20_mean"]) == pytest.approx(0.4)
    assert rows["none"]["aer_len_1-10_mean"] == ""


def test_no_aer_plot_without_gold_alignments(sweep):
    _, paths, _ = run_compare([sweep], n_boot=0)
    assert "aer_by_length.png" not in paths and not (sweep / "aer_by_length.png").exists()
    assert "Alignment error rate" not in paths["comparison.md"].read_text()


def test_peak_memory_and_decoding_speed_columns(tmp_path):
    """peak MB is the largest rank's job peak, averaged over seeds; a summary whose figure is the
    process's (a -m sweep's earlier jobs included), or written before the scope existed, shows —."""
    root = tmp_path / "sweep"
    job = {"peak_memory_scope": "job", "engine": {"name": "fast", "encoder": "e", "decoder": "d", "search": "s"}}
    make_run(root, "0", attention="none", seed=1, summary_extra={**job, "peak_rss_mb": [1000.0]},
             speed={"decode_seconds": 0.2, "sentences_per_s": 200.0, "device": "cpu", "threads": 1})
    make_run(root, "1", attention="none", seed=2, summary_extra={**job, "peak_rss_mb": [1100.0, 1200.0]},
             speed={"decode_seconds": 0.1, "sentences_per_s": 400.0, "device": "cpu", "threads": 1})
    make_run(root, "2", attention="bahdanau", summary_extra={"peak_memory_scope": "process", "peak_rss_mb": [900.0],
                                                            "engine": {"name": "reference"}, "precision": "float32"})
    make_run(root, "3", attention="luong", summary_extra={"peak_rss_mb": [800.0]})  # before the scope was written
    c = build_comparison([root], n_boot=0)
    m = {g.label: g.metrics for g in c.groups}
    assert m["none"]["peak_rss_mb"][0] == pytest.approx(1100.0)  # (1000 + max(1100, 1200)) / 2
    assert m["none"]["decode_sentences_per_s"][0] == pytest.approx(300.0)
    for label in ("bahdanau", "luong-general-feed"):
        assert m[label]["peak_rss_mb"] == (None, None)
        assert m[label]["decode_sentences_per_s"] == (None, None)
    out = tmp_path / "out"
    run_compare([root], out=out, n_boot=0)
    text = (out / "comparison.md").read_text()
    table = text[text.index("| config"):].split("\n\n")[0].split("\n")  # the first table
    header = [h.strip() for h in table[0].strip("|").split("|")]
    rows = {line.split("|")[1].strip(): [x.strip() for x in line.strip("|").split("|")] for line in table[2:]}
    assert rows["none"][header.index("peak MB")] == "1100 ± 141"
    assert rows["none"][header.index("decode sent/s")] == "300.0 ± 141.4"
    assert rows["bahdanau"][header.index("peak MB")] == "—"
    # the engine (and its precision where the summary has it) beside the speeds; — where it has neither
    assert [rows[k][header.index("engine")] for k in ("none", "bahdanau", "luong-general-feed")] == \
        ["fast", "reference float32", "—"]
    csv_engines = {r["label"]: r["engine"] for r in csv.DictReader((out / "comparison.csv").open())}
    assert csv_engines == {"none": "fast", "bahdanau": "reference float32", "luong-general-feed": ""}


def test_paired_bootstrap_hand_checked_cases(sweep):
    # none and bahdanau have identical hypotheses; luong's are the references themselves.
    c = build_comparison([sweep], n_boot=200, seed=7)
    groups = {g.label: g for g in c.groups}
    assert groups["none"].paired is None
    same = groups["bahdanau"].paired
    assert same.delta == 0.0 and same.p_value == 1.0 and same.ci.low == same.ci.high == 0.0
    perfect = groups["luong-general-feed"].paired
    assert perfect.delta > 30 and perfect.ci.low > 0 and perfect.p_value < 0.05
    assert c.bootstrap["computed"]
    other = build_comparison([sweep], n_boot=200, seed=7, baseline="luong-general-feed")
    assert {g.label: g for g in other.groups}["none"].paired.delta == pytest.approx(-perfect.delta)


def test_delta_by_length_needs_the_sources_of_one_report(sweep, tmp_path, caplog):
    c = build_comparison([sweep], n_boot=100)
    assert all(g.paired_buckets is None for g in c.groups)
    assert "no compared report has srcs.txt" in caplog.text
    # one run's stored sources are enough: the runs share one test set (same refs.txt)
    (sweep / "5" / "eval" / "test" / "srcs.txt").write_text("".join(x + "\n" for x in SRCS))
    c, paths, _ = run_compare([sweep], n_boot=100)
    groups = {g.label: g for g in c.groups}
    assert groups["none"].paired_buckets is None  # the baseline
    short, long, empty = groups["luong-general-feed"].paired_buckets
    assert empty is None  # the 21+ bucket holds no sentence
    # luong's hypotheses are the references, the baseline's truncated ones: better in both
    # buckets, by each bucket's own corpus BLEU difference (sentences 0-24 short, 25-39 long)
    assert short.ci.low > 0 and long.ci.low > 0 and short.p_value == long.p_value == 0.0
    assert short.delta == pytest.approx(paired_bootstrap(REFS[:25], BAD[:25], REFS[:25], n_boot=10).delta)
    assert long.delta == pytest.approx(paired_bootstrap(REFS[25:], BAD[25:], REFS[25:], n_boot=10).delta)
    same = groups["bahdanau"].paired_buckets  # the same hypotheses as the baseline
    assert [d.delta for d in same[:2]] == [0.0, 0.0] and same[0].p_value == 1.0
    md = paths["comparison.md"].read_text()
    assert "## ΔBLEU by length against `none`" in md
    assert "| config | 1-10 (n=25) | 11-20 (n=15) |" in md
    assert f"| luong-general-feed | {short.delta:+.2f} [{short.ci.low:+.2f}, {short.ci.high:+.2f}] p " in md
    assert "## BLEU by length relative to each config's shortest bucket" in md
    assert "| bahdanau | 1.00 | 0.63 |" in md  # 17 / 27 (fabricated bucket BLEU)
    with open(paths["comparison.csv"], newline="") as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    assert float(rows["luong-general-feed"]["delta_len_11-20"]) == pytest.approx(long.delta)
    assert rows["none"]["delta_len_11-20"] == "" and rows["bahdanau"]["relative_len_11-20"] != ""
    doc = json.loads(paths["comparison.json"].read_text())
    luong = next(x for x in doc["configs"] if x["label"] == "luong-general-feed")
    assert luong["p_value_len_1-10"] == pytest.approx(short.p_value)


def test_sources_with_the_wrong_line_count_are_refused(sweep, monkeypatch, capsys):
    (sweep / "0" / "eval" / "test" / "srcs.txt").write_text("one\ntwo\n")
    code, out, err = run_cli(monkeypatch, capsys, str(sweep))
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "srcs.txt has 2 lines but the references have 40" in lines[0]
    assert not (sweep / "comparison.md").exists()


def test_relative_bleu_divides_by_shortest_bucket(sweep):
    c = build_comparison([sweep], n_boot=0)
    rel = relative_bleu({g.label: g for g in c.groups}["bahdanau"])
    assert rel == pytest.approx([1.0, 17.0 / 27.0, None])
    assert not c.bootstrap["computed"]


def test_label_lists_other_differing_keys_but_not_seed_or_name(tmp_path):
    root = tmp_path / "sweep"
    make_run(root, "0", seed=1, extra={"optim": {"lr": 0.001}, "name": "a"})
    make_run(root, "1", seed=2, extra={"optim": {"lr": 0.001}, "name": "b"}, bleu=22.0)
    make_run(root, "2", seed=1, extra={"optim": {"lr": 0.0005}})
    make_run(root, "3", seed=1, extra={"optim": {"lr": 0.002}})
    c = build_comparison([root], n_boot=0)
    # lr=0.001 is the default, so that config is plain `bahdanau`; the others say what they set
    assert [(g.label, len(g.runs)) for g in c.groups] == [("bahdanau", 2), ("bahdanau optim.lr=0.0005", 1),
                                                          ("bahdanau optim.lr=0.002", 1)]
    assert c.baseline == "bahdanau"  # no `none` config: the first one


def test_a_key_added_since_a_run_was_made_takes_its_default_and_does_not_split_the_runs(tmp_path):
    """A run from before trainer.max_minutes existed lacks the key; a newer one has its default
    (null). They did the same, so they group together; a set value still sets its run apart."""
    root = tmp_path / "sweep"
    make_run(root, "0", seed=1)
    make_run(root, "1", seed=2, extra={"trainer": {"max_minutes": None}})
    make_run(root, "2", seed=3, extra={"trainer": {"max_minutes": 9}})
    c = build_comparison([root], n_boot=0)
    assert [(g.label, len(g.runs)) for g in c.groups] == [("bahdanau", 2), ("bahdanau trainer.max_minutes=9", 1)]


def test_lab_variants_are_labelled_by_their_model_names_alone(tmp_path):
    """An attention_zoo-like sweep: the switches the model name shows (heads, normalizer, local
    mode and window, coverage, position bias, decoder self-attention) do not also appear as
    key=value, and a variant never merges with the plain model."""
    root = tmp_path / "zoo"
    make_run(root, "0", attention="luong")
    make_run(root, "1", attention="luong", extra={"model": {"attention": {"position_bias": "relative"}}})
    make_run(root, "2", attention="luong", extra={"model": {"attention": {"heads": 4, "normalizer": "sparsemax"}}})
    make_run(root, "3", attention="luong", extra={"model": {"decoder_self_attention": True}})
    make_run(root, "4", attention="local", extra={"model": {"attention": {"mode": "predictive", "window": 4}}})
    make_run(root, "5", attention="bahdanau", extra={"model": {"attention": {"coverage": True}}})
    c = build_comparison([root], n_boot=0)
    assert [g.label for g in c.groups] == ["luong-general-feed", "luong-general-feed-rel",
                                           "luong-general-feed-h4-sparsemax", "luong-general-feed-sa",
                                           "local-p4-general-feed", "bahdanau-cov"]


def test_only_the_configs_that_set_a_key_away_from_its_default_carry_it_in_their_labels(tmp_path):
    """The zoo's coverage arm sets trainer.coverage_loss; the other arms keep their model names,
    and `none` is still the default baseline."""
    root = tmp_path / "zoo"
    make_run(root, "0", attention="none")
    make_run(root, "1", attention="bahdanau")
    make_run(root, "2", attention="bahdanau", extra={"model": {"attention": {"coverage": True}},
                                                     "trainer": {"coverage_loss": 1.0, "coverage_loss_start": 300}})
    c = build_comparison([root], n_boot=0)
    assert [g.label for g in c.groups] == ["none", "bahdanau",
                                           "bahdanau-cov trainer.coverage_loss=1.0 trainer.coverage_loss_start=300"]
    assert c.baseline == "none"
    assert build_comparison([root], n_boot=0, baseline="bahdanau").baseline == "bahdanau"


def test_a_baseline_is_found_by_its_model_name_when_training_keys_lengthen_its_label(tmp_path):
    """Two Bahdanau configs that both set a key: --baseline bahdanau is ambiguous and says so
    with the full labels; a model name that one config alone has still finds it."""
    root = tmp_path / "zoo"
    make_run(root, "0", attention="none", extra={"trainer": {"label_smoothing": 0.1}})
    make_run(root, "1", attention="bahdanau", extra={"trainer": {"coverage_loss": 0.5}})
    make_run(root, "2", attention="bahdanau", extra={"trainer": {"coverage_loss": 1.0}})
    make_run(root, "3", attention="luong", extra={"trainer": {"coverage_loss": 1.0}})
    assert build_comparison([root], n_boot=0).baseline == "none trainer.label_smoothing=0.1"
    assert build_comparison([root], n_boot=0, baseline="luong-general-feed").baseline == \
        "luong-general-feed trainer.coverage_loss=1.0"
    full = "bahdanau trainer.coverage_loss=1.0"
    assert build_comparison([root], n_boot=0, baseline=full).baseline == full
    with pytest.raises(CompareError, match=r"--baseline 'bahdanau' names 2 configs; give one label in full: "
                                           r"'bahdanau trainer.coverage_loss=0.5', 'bahdanau trainer.coverage_loss=1.0'"):
        build_comparison([root], n_boot=0, baseline="bahdanau")


def test_describe_matches_model_description():
    from seq2seq.core.config import AttentionConfig, AttentionType, LuongScore, ModelConfig
    from seq2seq.model.network import describe as model_describe

    for kind in AttentionType:
        for score in LuongScore:
            for feed in (True, False):
                cfg = ModelConfig(attention=AttentionConfig(type=kind, score=score, input_feeding=feed))
                flat = {"model.attention.type": kind.value, "model.attention.score": score.value,
                        "model.attention.input_feeding": feed}
                assert describe(flat) == model_describe(cfg)
    lab = {"model.attention.type": "local", "model.attention.score": "scaled_dot", "model.attention.mode": "predictive",
           "model.attention.window": 4, "model.attention.input_feeding": False}
    assert describe(lab) == "local-p4-scaled_dot"
    assert describe({"model.attention.type": "bahdanau", "model.attention.heads": 2,
                     "model.attention.normalizer": "sparsemax", "model.attention.coverage": True}) == \
        "bahdanau-h2-sparsemax-cov"
    assert describe({"model.attention.type": "luong", "model.attention.unknown_key": 1}) == "luong"


def test_a_model_key_is_left_out_of_labels_exactly_when_the_model_name_shows_it():
    """IGNORED_KEYS and ``describe`` must agree: a model switch the name does not show has to
    appear as key=value (or two different models would merge), and one it shows must not appear
    twice. Each field of the model config is changed alone on bases where it can matter."""
    import dataclasses
    import enum

    from seq2seq.core.config import AttentionConfig, AttentionType, ModelConfig
    from seq2seq.evaluation.compare import IGNORED_KEYS
    from seq2seq.model.network import describe as model_describe

    def changed(value):
        if isinstance(value, bool):
            return not value
        if isinstance(value, enum.Enum):
            return next(m for m in type(value) if m != value)
        if isinstance(value, int):
            return value + 2
        return value

    bases = [ModelConfig(attention=AttentionConfig(type=kind)) for kind in AttentionType]
    for path in ([f"attention.{f.name}" for f in dataclasses.fields(AttentionConfig)]
                 + [f.name for f in dataclasses.fields(ModelConfig) if f.name != "attention"]):
        named = False
        for base in bases:
            cfg = dataclasses.replace(base, attention=dataclasses.replace(base.attention))
            holder, field = (cfg.attention, path.split(".")[1]) if path.startswith("attention.") else (cfg, path)
            new_value = changed(getattr(holder, field))
            if new_value == getattr(holder, field):
                continue  # not a switch (floats, sizes of another kind): a differing value is listed
            setattr(holder, field, new_value)
            named = named or model_describe(cfg) != model_describe(base)
        assert named == (f"model.{path}" in IGNORED_KEYS), path


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"bleu_sig": BLEU_SIG.replace("13a", "intl")}, "BLEU signature"),
    ({"search": {**GREEDY, "max_len_ratio": 3.0}}, "search settings"),
    ({"refs": [r.upper() for r in REFS]}, "references"),
])
def test_refuses_incomparable_reports(tmp_path, monkeypatch, capsys, kwargs, field):
    a = make_run(tmp_path, "a", attention="none")
    b = make_run(tmp_path, "b", **kwargs)
    code, out, err = run_cli(monkeypatch, capsys, str(a), str(b), "--out", str(tmp_path / "cmp"))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot compare")
    assert str(a) in lines[0] and str(b) in lines[0] and field in lines[0]
    assert not (tmp_path / "cmp").exists()


def test_missing_and_unfinished_runs_are_listed(tmp_path, caplog):
    from seq2seq.core.checkpoint import save_checkpoint

    root = tmp_path / "sweep"
    make_run(root, "0", attention="none", bleu=10.0)
    make_run(root, "1", bleu=20.0)
    make_run(root, "2", seed=2, eval_name=None)  # never evaluated
    make_run(root, "3", seed=3, finished=False, bleu=5.0)  # summary says unfinished
    cut = make_run(root, "4", seed=4, summary=False, bleu=6.0)  # cut short: checkpoint only
    progress = {"step": 120, "best_bleu": 3.0, "best_step": 100, "train_seconds": 10.0,
                "train_tokens": 5000, "finished": False}
    save_checkpoint({"progress": progress, "num_parameters": 1000, "model_description": "bahdanau"},
                    cut / "checkpoints" / "last.pt")
    done = make_run(root, "5", seed=5, summary=False, bleu=24.0)  # finished, written before summary.json
    for name in ("last", "best"):
        save_checkpoint({"progress": {**progress, "finished": True}, "num_parameters": 1000,
                         "model_description": "bahdanau"}, done / "checkpoints" / f"{name}.pt")
    with caplog.at_level(logging.WARNING):
        c, paths, _ = run_compare([root], n_boot=50)
    skipped = {r.path.name: r.problems for r in c.skipped}
    assert set(skipped) == {"2", "3", "4"}
    assert "no eval report" in skipped["2"][0]
    assert "summary.json" in skipped["3"][0] and "step 120" in skipped["4"][0]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("not compared" in w for w in warned) == 3
    bahdanau = {g.label: g for g in c.groups}["bahdanau"]
    assert [r.path.name for r in bahdanau.runs] == ["1", "5"]
    assert bahdanau.metrics["bleu"][0] == pytest.approx(22.0)
    assert bahdanau.metrics["tokens_per_s"][0] == pytest.approx((1000.0 + 500.0) / 2)  # 5000 tok / 10 s
    doc = json.loads(paths["comparison.json"].read_text())
    assert {Path(x["path"]).name for x in doc["not_compared"]} == {"2", "3", "4"}
    assert "not finished" in paths["comparison.md"].read_text()
    kept = build_comparison([root], n_boot=0, include_unfinished=True)
    assert len({g.label: g for g in kept.groups}["bahdanau"].runs) == 4
    assert {r.path.name for r in kept.unfinished_used} == {"3", "4"}


def test_nothing_usable_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    make_run(tmp_path / "sweep", "0", eval_name=None)
    make_run(tmp_path / "sweep", "1", finished=False)
    code, out, err = run_cli(monkeypatch, capsys, str(tmp_path / "sweep"))
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: nothing to compare")
    code, _, err = run_cli(monkeypatch, capsys, str(tmp_path / "nowhere"))
    assert code == 2 and "no such directory" in err


def test_newest_eval_dir_and_search_setting(tmp_path):
    run = make_run(tmp_path, "r", bleu=20.0)
    newer = make_run(tmp_path, "tmp", bleu=25.0)
    (newer / "eval" / "test").rename(run / "eval" / "test-2")
    beam = make_run(tmp_path, "tmp2", bleu=30.0, search={**GREEDY, "beam_size": 5})
    (beam / "eval" / "test").rename(run / "eval" / "test-beam5")
    assert build_comparison([run], n_boot=0).groups[0].metrics["bleu"][0] == 25.0
    c = build_comparison([run], n_boot=0, search="beam5")
    assert c.groups[0].metrics["bleu"][0] == 30.0 and c.reference.search["beam_size"] == 5
    with pytest.raises(CompareError, match="--search"):
        build_comparison([run], search="beam")


@pytest.mark.parametrize(("search", "folder"), [
    ("beam5-averaged", "test-beam5-averaged"), ("greedy-averaged", "test-averaged"), ("greedy-last", "test-last"),
    ("beam5-lp0.6-averaged", "test-beam5-lp0.6-averaged"), ("beam3-ensemble2", "test-beam3-ensemble2"),
    ("beam5-ensemble3-averaged", "test-beam5-ensemble3-averaged"),
])
def test_search_with_a_model_suffix_reads_the_reports_seq2seq_evaluate_names_so(tmp_path, search, folder):
    """seq2seq-evaluate writes checkpoint=averaged|last and ensembles beside the best checkpoint's
    report (eval/<split>[-<search>]-<model>); --search <search>-<model> compares those, and the
    plain --search still reads the best checkpoint's."""
    run = make_run(tmp_path, "r", bleu=20.0)
    other = make_run(tmp_path, "tmp", bleu=31.0)
    (other / "eval" / "test").rename(run / "eval" / folder)
    assert build_comparison([run], n_boot=0, search=search).groups[0].metrics["bleu"][0] == 31.0
    assert build_comparison([run], n_boot=0).groups[0].metrics["bleu"][0] == 20.0


@pytest.mark.parametrize("search", ["beam5-average", "averaged", "beam5-ensemble", "greedy-best", "beam5-averaged-2"])
def test_a_search_with_an_unknown_model_suffix_is_refused(tmp_path, monkeypatch, capsys, search):
    run = make_run(tmp_path, "r")
    with pytest.raises(CompareError, match=r"--search .*-averaged, -last or -ensemble<N>"):
        build_comparison([run], search=search)
    code, out, err = run_cli(monkeypatch, capsys, str(run), "--search", search, "--out", str(tmp_path / "cmp"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "-ensemble<N>" in err
    assert not (tmp_path / "cmp").exists()


def test_out_dir_rules_and_no_overwrite(sweep, tmp_path, monkeypatch, capsys):
    runs = [str(sweep / "0"), str(sweep / "2")]
    code, _, err = run_cli(monkeypatch, capsys, *runs)
    assert code == 2 and "--out" in err
    code, out, _ = run_cli(monkeypatch, capsys, *runs, "--out", str(tmp_path / "cmp"), "--bootstrap", "50")
    assert code == 0 and out.startswith("| config | runs | BLEU |")
    first = (tmp_path / "cmp" / "comparison.md").read_text()
    code, _, _ = run_cli(monkeypatch, capsys, *runs, "--out", str(tmp_path / "cmp"), "--bootstrap", "0",
                         "--baseline", "bahdanau")
    assert code == 0 and (tmp_path / "cmp" / "comparison.md").read_text() == first
    for name in ("comparison-2.md", "comparison-2.csv", "comparison-2.json", "bleu_by_length-2.png",
                 "bleu_by_length_relative-2.png"):
        assert (tmp_path / "cmp" / name).is_file()
    assert "bleu_by_length-2.png" in (tmp_path / "cmp" / "comparison-2.md").read_text()
    code, _, err = run_cli(monkeypatch, capsys, *runs, "--out", str(tmp_path / "x"), "--baseline", "nope")
    assert code == 2 and "none, bahdanau" in err


def test_console_script(sweep):
    exe = Path(sys.executable).with_name("seq2seq-compare")
    if not exe.exists():
        pytest.skip("seq2seq-compare is not installed next to this Python")
    (sweep / "1" / "eval" / "test" / "report.json").unlink()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([str(exe), str(sweep), "--bootstrap", "50"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("| config |") and "| none | 1 |" in proc.stdout
    assert "WARNING:" in proc.stderr and "no eval report" in proc.stderr
    assert (sweep / "comparison.md").is_file()
