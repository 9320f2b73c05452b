"""Checkpoint averaging, ensembles and n-best lists as a user meets them: seq2seq-average,
seq2seq-evaluate / seq2seq-translate with checkpoint=averaged, ensemble=[...] and search.nbest,
and every refusal as one error line with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_train_cli import TEST_SIZE, ok, one_line_error, run_cli, train

from seq2seq.core.checkpoint import load_checkpoint, step_checkpoints, step_of

KEEP = ["trainer.max_steps=30", "trainer.valid_every=5", "trainer.keep_checkpoints=3",
        "trainer.keep_best_checkpoints=3"]
SOURCES = b"kleine hund sieht den mann\n\nder alte mann liest ein buch\n"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache) -> dict[str, Path]:
    """A: bahdanau keeping its 3 newest and 3 best checkpoints; A2: a copy of A; B: luong, same
    tokenizer; C: another tokenizer."""
    base = tmp_path_factory.mktemp("runs")
    a = train(base / "a", cache, *KEEP)
    a2 = base / "a2"
    shutil.copytree(a, a2)
    b = train(base / "b", cache, "model/attention=luong", "seed=7")
    c = train(base / "c", cache, "tokenizer.vocab_size=300")
    return {"a": a, "a2": a2, "b": b, "c": c, "cwd": base}


def test_training_keeps_the_newest_and_the_best_checkpoints(runs):
    ckpt = runs["a"] / "checkpoints"
    validations = load_checkpoint(ckpt / "last.pt")["progress"]["validations"]
    assert [step for step, _ in validations] == [5, 10, 15, 20, 25, 30]
    best3 = {step for step, _ in sorted(validations, key=lambda v: (-v[1], v[0]))[:3]}
    assert {step_of(p) for p in step_checkpoints(ckpt)} == {20, 25, 30} | best3
    for path in step_checkpoints(ckpt):
        assert load_checkpoint(path)["valid_bleu"] == dict(map(tuple, validations))[step_of(path)]


def test_average_last_n_is_the_mean_of_the_newest_checkpoints_and_evaluates(runs, cache):
    run, cwd = runs["a"], runs["cwd"]
    proc = ok(run_cli("seq2seq-average", [f"run_dir={run}", "last=3"], cwd, cache))
    out = run / "checkpoints" / "averaged.pt"
    assert proc.stdout.decode().strip() == str(out)
    averaged = load_checkpoint(out)
    assert averaged["averaged"]["steps"] == [30, 25, 20] and averaged["averaged"]["mode"] == "last"
    states = [load_checkpoint(run / "checkpoints" / f"step-{s}.pt")["model"] for s in (30, 25, 20)]
    for key, value in averaged["model"].items():
        expected = (sum(s[key].double() for s in states) / 3).to(value.dtype)
        torch.testing.assert_close(value, expected)
    ok(run_cli("seq2seq-evaluate", [f"run_dir={run}", "checkpoint=averaged", "eval.bootstrap_samples=10"], cwd, cache))
    report = json.loads((run / "eval" / "test-averaged" / "report.json").read_text())
    assert report["checkpoint"].endswith("checkpoints/averaged.pt") and report["num_sentences"] == TEST_SIZE
    lines = ok(run_cli("seq2seq-translate", [f"run_dir={run}", "checkpoint=averaged"], cwd, cache,
                       stdin=SOURCES)).stdout.decode().splitlines()
    assert len(lines) == 3 and lines[1] == ""
    # a second average replaces the first only when asked
    err = one_line_error(run_cli("seq2seq-average", [f"run_dir={run}", "best=2"], cwd, cache), "averaged.pt",
                         "overwrite=true")
    assert "already exists" in err and load_checkpoint(out)["averaged"]["mode"] == "last"
    ok(run_cli("seq2seq-average", [f"run_dir={run}", "best=2", "overwrite=true"], cwd, cache))
    best = load_checkpoint(out)["averaged"]
    validations = load_checkpoint(run / "checkpoints" / "last.pt")["progress"]["validations"]
    top2 = sorted(validations, key=lambda v: (-v[1], v[0]))[:2]
    assert sorted(best["steps"]) == sorted(step for step, _ in top2) and best["mode"] == "best"


@pytest.mark.parametrize(("args", "fragments"), [
    ([], ("exactly one of last=N", "best=N")),
    (["last=2", "best=2"], ("exactly one of",)),
    (["last=0"], ("last must be a positive",)),
    (["last=9", "overwrite=true"], ("holds 6 step checkpoints", "last=9 needs 9", "trainer.keep_checkpoints=9")),
    (["best=7", "overwrite=true"], ("best=7 needs 7", "trainer.keep_best_checkpoints=7")),
    (["last=two"], ("last",)),
])
def test_average_refuses_bad_requests_in_one_line(runs, cache, args, fragments):
    run = runs["a2"]  # never averaged: a refusal must leave no averaged.pt
    one_line_error(run_cli("seq2seq-average", [f"run_dir={run}", *args], runs["cwd"], cache), *fragments)
    assert not (run / "checkpoints" / "averaged.pt").exists()


def test_average_of_a_missing_run_and_evaluating_a_missing_average_say_what_to_do(runs, cache, tmp_path):
    one_line_error(run_cli("seq2seq-average", [f"run_dir={tmp_path / 'nope'}", "last=2"], tmp_path, cache),
                   "no checkpoints/ folder")
    one_line_error(run_cli("seq2seq-evaluate", [f"run_dir={runs['a2']}", "checkpoint=averaged"], tmp_path, cache),
                   "no checkpoints/averaged.pt", "seq2seq-average")
    assert not (runs["a2"] / "eval" / "test-averaged").exists()


def test_an_ensemble_of_a_run_with_its_copy_translates_as_the_run(runs, cache):
    cwd, a, a2 = runs["cwd"], runs["a"], runs["a2"]
    alone = ok(run_cli("seq2seq-translate", [f"run_dir={a}"], cwd, cache, stdin=SOURCES)).stdout
    both = ok(run_cli("seq2seq-translate", [f"run_dir={a}", f"ensemble=[{a2}]"], cwd, cache, stdin=SOURCES)).stdout
    assert both == alone


def test_an_ensemble_evaluates_into_its_own_report(runs, cache):
    cwd, a, b = runs["cwd"], runs["a"], runs["b"]
    ok(run_cli("seq2seq-evaluate", [f"run_dir={a}", f"ensemble=[{b}]", "search=beam", "search.beam_size=3",
                                    "eval.bootstrap_samples=10"], cwd, cache))
    report = json.loads((a / "eval" / "test-beam3-ensemble2" / "report.json").read_text())
    assert report["model"] == "ensemble of 2: bahdanau + luong-general-feed"
    assert report["checkpoint"] == f"{a}/checkpoints/best.pt + {b}/checkpoints/best.pt"
    assert "attention" not in report and report["num_sentences"] == TEST_SIZE
    assert not (b / "eval" / "test-beam3-ensemble2").exists()


@pytest.mark.parametrize(("which", "args", "fragments"), [
    ("translate", ["ensemble=[{c}]"], ("different tokenizers",)),
    ("evaluate", ["ensemble=[{c}]"], ("different tokenizers",)),
    ("translate", ["ensemble=[{a}]"], ("listed twice",)),
    ("translate", ["ensemble=[{cwd}/missing]"], ("ensemble: run directory", "does not exist")),
    ("translate", ["ensemble=[{b}]", "alignments=true"], ("alignments=true needs one attention model", "drop ensemble")),
    ("evaluate", ["ensemble=[{b}]", "align_file=x.txt"], ("an ensemble has none",)),
])
def test_ensembles_that_cannot_work_are_refused_in_one_line(runs, cache, which, args, fragments):
    a = runs["a"]
    before = sorted(p.name for p in (a / "eval").iterdir())
    filled = [arg.format(**{k: str(v) for k, v in runs.items()}) for arg in args]
    one_line_error(run_cli(f"seq2seq-{which}", [f"run_dir={a}", *filled], runs["cwd"], cache, stdin=SOURCES),
                   *fragments)
    assert sorted(p.name for p in (a / "eval").iterdir()) == before


def test_translate_nbest_prints_k_numbered_scored_lines_per_input_line(runs, cache):
    cwd, b = runs["cwd"], runs["b"]
    out = ok(run_cli("seq2seq-translate", [f"run_dir={b}", "search=beam", "search.beam_size=5", "search.nbest=3"],
                     cwd, cache, stdin=SOURCES)).stdout.decode()
    rows = [line.split("\t") for line in out.splitlines()]
    assert all(len(r) == 3 for r in rows)
    assert [r[0] for r in rows] == ["1", "1", "1", "2", "3", "3", "3"]
    assert rows[3] == ["2", "0.0000", ""]  # the empty input line
    for n in ("1", "3"):
        scores = [float(r[1]) for r in rows if r[0] == n]
        assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
        assert len({r[2] for r in rows if r[0] == n}) == 3


@pytest.mark.parametrize(("args", "fragments"), [
    (["search.nbest=3"], ("search.nbest=3 needs a beam",)),
    (["search=beam", "search.beam_size=4", "search.nbest=2", "alignments=true"], ("drop search.nbest",)),
    (["search=beam", "search.nbest=0"], ("search.nbest must be a positive",)),
])
def test_bad_nbest_requests_are_refused_in_one_line(runs, cache, args, fragments):
    proc = run_cli("seq2seq-translate", [f"run_dir={runs['b']}", *args], runs["cwd"], cache, stdin=SOURCES)
    one_line_error(proc, *fragments)
    assert proc.stdout == b""


def test_num_threads_sets_the_decoding_threads_and_leaves_the_output_alone(runs, cache):
    """A user decoding beside a training sets num_threads, as trainer.num_threads for training."""
    cwd, b = runs["cwd"], runs["b"]
    before = set((b / "eval").iterdir())
    proc = ok(run_cli("seq2seq-evaluate", [f"run_dir={b}", "num_threads=1", "split=valid",
                                           "eval.bootstrap_samples=10"], cwd, cache))
    (new,) = set((b / "eval").iterdir()) - before
    assert json.loads((new / "report.json").read_text())["speed"]["threads"] == 1
    assert "cpu, 1 thread)" in proc.stdout.decode()
    default = ok(run_cli("seq2seq-translate", [f"run_dir={b}"], cwd, cache, stdin=SOURCES)).stdout
    assert ok(run_cli("seq2seq-translate", [f"run_dir={b}", "num_threads=1"], cwd, cache, stdin=SOURCES)).stdout == default


@pytest.mark.parametrize("which", ["evaluate", "translate"])
@pytest.mark.parametrize(("value", "fragments"), [
    ("-1", ("num_threads must be 0 (all cores) or positive", "-1")),
    ("two", ("num_threads", "two")),
])
def test_bad_num_threads_is_refused_in_one_line(runs, cache, which, value, fragments):
    b = runs["b"]
    before = sorted(p.name for p in (b / "eval").iterdir())
    proc = run_cli(f"seq2seq-{which}", [f"run_dir={b}", f"num_threads={value}"], runs["cwd"], cache, stdin=SOURCES)
    one_line_error(proc, *fragments)
    assert proc.stdout == b"" and sorted(p.name for p in (b / "eval").iterdir()) == before
