"""Word alignments from attention, gold alignments of the synthetic corpus, and AER."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_cli import ok, one_line_error, run_cli, run_dirs

from seq2seq.core.config import SyntheticConfig
from seq2seq.data.synthetic import (
    build_lexicon,
    generate_synthetic,
    gold_alignments,
    translate_aligned,
)
from seq2seq.evaluation.alignment import (
    alignment_score,
    attention_links,
    format_links,
    parse_links,
    word_index,
)


def test_pieces_belong_to_the_word_their_boundary_mark_opens():
    assert word_index(["\u2581ab", "c", "\u2581d", "\u2581e", "f"]) == [0, 0, 1, 2, 2]
    assert word_index(["x", "\u2581y"]) == [0, 1]  # a first piece without the mark still opens word 0


def test_each_target_piece_links_to_the_word_of_its_most_attended_source_piece():
    src = ["\u2581ab", "c", "\u2581d"]  # words 0 0 1, then EOS (column 3)
    tgt = ["\u2581x", "\u2581y", "z"]  # words 0 1 1, then EOS (row 3)
    w = torch.tensor([[0.1, 0.7, 0.1, 0.1],   # x -> c (word 0)
                      [0.0, 0.0, 0.9, 0.1],   # y -> d (word 1)
                      [0.1, 0.1, 0.1, 0.7],   # z -> EOS: no link
                      [0.0, 0.0, 0.0, 1.0]])  # the EOS step is not a word
    assert attention_links(w, src, tgt) == {(0, 0), (1, 1)}
    assert format_links({(1, 1), (0, 0)}) == "0-0 1-1"


def test_aer_precision_and_recall_follow_och_and_ney():
    gold = [({(0, 0), (1, 1)}, {(0, 0), (1, 1), (1, 2)})]  # two sure links and one possible
    perfect = alignment_score([{(0, 0), (1, 1)}], gold)
    assert (perfect.precision, perfect.recall, perfect.aer) == (1.0, 1.0, 0.0)
    with_possible = alignment_score([{(0, 0), (1, 1), (1, 2)}], gold)
    assert with_possible.aer == 0.0 and with_possible.precision == 1.0  # a possible link is no error
    half = alignment_score([{(0, 0), (2, 2)}], gold)
    assert half.precision == 0.5 and half.recall == 0.5 and half.aer == pytest.approx(0.5)
    assert alignment_score([{(5, 5)}], gold).aer == 1.0


def test_pharaoh_lines_parse_and_bad_tokens_name_their_place():
    assert parse_links("0-1 2?3", "f line 1") == ({(0, 1)}, {(0, 1), (2, 3)})
    assert parse_links("", "f line 2") == (set(), set())
    for bad in ("0-x", "1:2", "-1-2", "3"):
        with pytest.raises(ValueError, match=r"f line 7: .* is not an alignment link"):
            parse_links(bad, "f line 7")


def test_the_synthetic_generator_knows_each_pairs_word_alignment():
    cfg = SyntheticConfig(train_size=10, valid_size=10, test_size=300, max_len=40)
    lex = build_lexicon(cfg)
    src_lines, tgt_lines = generate_synthetic(cfg)["test"]
    for src, tgt, line in zip(src_lines, tgt_lines, gold_alignments(src_lines, lex)):
        s, t = src.split(), tgt.split()
        links = parse_links(line, "gold")[0]
        assert sorted(j for _, j in links) == list(range(len(t)))  # one-to-one, every word
        assert sorted(i for i, _ in links) == list(range(len(s)))
        assert all(lex.to_target[s[i]] == t[j] for i, j in links)
        assert translate_aligned(s, lex)[0] == t
    flipped = gold_alignments(src_lines[:1], lex, flip=True)[0]
    assert parse_links(flipped, "x")[0] == {(j, i) for i, j in parse_links(gold_alignments(src_lines[:1], lex)[0],
                                                                           "x")[0]}


# ----------------------------------------------------------------------------- from the command line


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    cwd = tmp_path_factory.mktemp("align")
    ok(run_cli("seq2seq-train", ["experiment=smoke", "trainer.max_steps=10", "trainer.valid_every=10",
                                 "eval.bootstrap_samples=100"], cwd, cache_dir))
    return run_dirs(cwd)[0]


def test_a_synthetic_evaluation_scores_alignments_against_the_generators_gold(run):
    report = json.loads((run / "eval" / "test" / "report.json").read_text())
    alignment = report["attention"]["alignment"]
    assert alignment["sentences"] == 100 and 0.0 <= alignment["aer"] <= 1.0
    assert alignment["gold_sure"] > 0 and len(alignment["buckets"]) == len(report["buckets"])


def test_align_file_scores_the_same_as_the_corpus_gold(run, tmp_path, cache_dir):
    from test_train_cli import smoke_config

    from seq2seq.data.corpus import load_corpus
    from seq2seq.pipeline import load_split  # noqa: F401 (the same loader the command uses)

    gold = load_corpus(smoke_config(run).data)["test"]["align"]
    path = tmp_path / "gold.align"
    path.write_text("".join(f"{g}\n" for g in gold), encoding="utf-8")
    ok(run_cli("seq2seq-evaluate", [f"run_dir={run}", "split=test", f"align_file={path}",
                                    "eval.bootstrap_samples=100"], tmp_path, cache_dir))
    first = json.loads((run / "eval" / "test" / "report.json").read_text())["attention"]["alignment"]
    again = json.loads((run / "eval" / "test-2" / "report.json").read_text())["attention"]["alignment"]
    assert again == first


@pytest.mark.parametrize("content, fragment", [
    ("0-0\n", "has 1 lines for 100 sentences"),
    ("0-0\n" * 50 + "0-x\n" + "0-0\n" * 49, "line 51: '0-x' is not an alignment link"),
])
def test_a_bad_align_file_is_one_line_before_decoding(run, tmp_path, cache_dir, content, fragment):
    path = tmp_path / "gold.align"
    path.write_text(content, encoding="utf-8")
    before = sorted(p.name for p in (run / "eval").iterdir())
    proc = run_cli("seq2seq-evaluate", [f"run_dir={run}", "split=test", f"align_file={path}"], tmp_path, cache_dir)
    one_line_error(proc, fragment)
    assert sorted(p.name for p in (run / "eval").iterdir()) == before  # nothing written


def test_translate_prints_each_translation_with_its_alignment(run, tmp_path, cache_dir):
    out = ok(run_cli("seq2seq-translate", [f"run_dir={run}", "alignments=true"], tmp_path, cache_dir,
                     stdin=b"ba ki du .\n\nka ti .\n"))
    lines = out.stdout.decode().split("\n")[:-1]
    assert len(lines) == 3 and all(line.count("\t") == 1 for line in lines)
    assert lines[1] == "\t"  # an empty line stays empty
    for line in lines:
        parse_links(line.split("\t")[1], "output")


def test_alignments_need_an_attention_model(tmp_path, cache_dir):
    ok(run_cli("seq2seq-train", ["experiment=smoke", "model/attention=none", "trainer.max_steps=2",
                                 "trainer.valid_every=2", "trainer.evaluate_at_end=false"], tmp_path, cache_dir))
    [none_run] = run_dirs(tmp_path)
    proc = run_cli("seq2seq-translate", [f"run_dir={none_run}", "alignments=true"], tmp_path, cache_dir,
                   stdin=b"ba ki du .\n")
    one_line_error(proc, "alignments=true needs an attention model")
    assert proc.stdout == b""
