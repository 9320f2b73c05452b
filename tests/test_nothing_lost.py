"""Nothing lost, nothing silent: used and locked run directories, places that cannot be written,
bad keys refused before work starts, and the warnings for what would otherwise pass unsaid; each
the way a user meets it (the command in a subprocess) where that matters."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import smoke_config
from test_train_cli import BIN, one_line_error, run_cli

from seq2seq.core.config import AttentionConfig, AttentionType, ModelConfig, TrainConfig
from seq2seq.core.errors import DataError, RunDirError, TrainingError
from seq2seq.core.runlock import lock_run_dir, run_markers


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


# ----------------------------------------------------------------------------- used run directories


@pytest.mark.parametrize("marker", ["summary.json", "train.log", "eval", ".hydra"])
def test_a_directory_with_any_part_of_an_earlier_run_is_refused_untouched(marker, tmp_path, cache_dir):
    run = tmp_path / "old-run"
    run.mkdir()
    (run / marker).mkdir() if marker in ("eval", ".hydra") else (run / marker).write_text("earlier run\n")
    before = sorted(p.name for p in run.iterdir())
    one_line_error(run_cli("seq2seq-train", ["experiment=smoke", f"hydra.run.dir={run}"], tmp_path, cache_dir),
                   str(run), marker, "trainer.resume=")
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_sweep_into_a_used_sweep_directory_is_refused_before_hydra_rewrites_it(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    overrides = sweep / "0" / ".hydra" / "overrides.yaml"
    overrides.write_text("- model/attention=none\n")
    one_line_error(run_cli("seq2seq-train", ["-m", "experiment=smoke", "model/attention=bahdanau,luong",
                                             f"hydra.sweep.dir={sweep}"], tmp_path, cache_dir), str(sweep))
    assert overrides.read_text() == "- model/attention=none\n"
    assert sorted(p.name for p in sweep.iterdir()) == ["0"]


def test_run_markers():
    assert run_markers(Path("/nonexistent")) == []


# ----------------------------------------------------------------------------- the lock


_HOLDER = ("import sys, time; from pathlib import Path; from seq2seq.core.runlock import lock_run_dir; "
           "lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)")


def test_a_second_trainer_stops_naming_the_holder_and_a_killed_holder_frees_the_run(tmp_path, cache_dir):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"in use by another training process \(PID {holder.pid}\)"):
            lock_run_dir(run)
        # the command: a resume started while the run still trains
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text("- experiment=smoke\n")
        one_line_error(run_cli("seq2seq-train", [f"trainer.resume={run}"], tmp_path, cache_dir),
                       f"PID {holder.pid}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_run_dir(run)  # the kernel dropped the killed holder's lock: this process takes it at once


# ----------------------------------------------------------------------------- places that cannot be written


@pytest.mark.parametrize("where", ["through-a-file", "proc"])
def test_a_run_directory_that_cannot_be_made_is_one_line(where, tmp_path, cache_dir):
    if where == "through-a-file":
        (tmp_path / "a-file").write_text("x")
        target = tmp_path / "a-file" / "run"
    else:
        target = Path("/proc/seq2seq-run")
    one_line_error(run_cli("seq2seq-train", ["experiment=smoke", f"hydra.run.dir={target}"], tmp_path, cache_dir),
                   str(target.parent) if where == "through-a-file" else "/proc")


def test_a_name_that_leaves_outputs_is_refused_and_nothing_is_made(tmp_path, cache_dir):
    one_line_error(run_cli("seq2seq-train", ["experiment=smoke", "name=../.."], tmp_path, cache_dir), "name=../..")
    assert not (tmp_path / "outputs").exists()


def test_a_bad_config_leaves_no_run_directory(tmp_path, cache_dir):
    one_line_error(run_cli("seq2seq-train", ["experiment=smoke", "trainer.max_tokens=0"], tmp_path, cache_dir),
                   "trainer.max_tokens")
    assert not list(tmp_path.glob("outputs/*/*"))


def test_compare_out_that_is_a_file_is_one_line(tmp_path, cache_dir):
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    (tmp_path / "out-file").write_text("x")
    proc = run_cli("seq2seq-compare", [str(tmp_path / "sweep"), "--out", str(tmp_path / "out-file")], tmp_path,
                   cache_dir)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err, err


# ----------------------------------------------------------------------------- signals outside the loop


def test_sigterm_during_data_preparation_is_one_line(tmp_path, cache_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "SEQ2SEQ_CACHE": str(tmp_path / "c"),
           "OMP_NUM_THREADS": "1"}
    env.pop("SEQ2SEQ_DEBUG", None)
    run = tmp_path / "run"
    proc = subprocess.Popen([str(BIN / "seq2seq-train"), "experiment=smoke", "data.synthetic.train_size=400000",
                             f"hydra.run.dir={run}"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "train.log").exists() and time.monotonic() < deadline:  # the job has started
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.rstrip().splitlines()[-1].startswith("error: interrupted"), err[-2000:]


# ----------------------------------------------------------------------------- said, not silent


def test_keys_the_model_does_not_read_are_warned_about(caplog):
    from seq2seq.pipeline import warn_unused_keys

    cfg = TrainConfig(model=ModelConfig(attention=AttentionConfig(type=AttentionType.bahdanau, input_feeding=False)))
    with caplog.at_level(logging.WARNING):
        warn_unused_keys(cfg)
    assert any("model.attention.input_feeding=False does not apply to bahdanau" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    warn_unused_keys(TrainConfig())
    assert not caplog.records


def test_a_coverage_penalty_start_that_never_takes_effect_is_warned_about(caplog):
    from seq2seq.core.config import TrainerConfig
    from seq2seq.pipeline import warn_unused_keys

    def warnings(**trainer) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            warn_unused_keys(TrainConfig(trainer=TrainerConfig(**trainer)))
        return [r.getMessage() for r in caplog.records]

    assert any("coverage_loss_start=300 has no effect: trainer.coverage_loss=0" in m
               for m in warnings(coverage_loss_start=300))
    assert any("coverage_loss_start=2000 is not reached within trainer.max_steps=600" in m
               for m in warnings(coverage_loss=1.0, coverage_loss_start=2000, max_steps=600))
    assert not warnings(coverage_loss=1.0, coverage_loss_start=300, max_steps=600)
    assert not warnings(coverage_loss=1.0, coverage_loss_start=2000)  # an epoch budget: cannot be known
    assert not warnings(coverage_loss=1.0)


def test_a_token_cap_below_a_sentence_is_counted():
    from seq2seq.data.batching import TokenBatchSampler

    sampler = TokenBatchSampler([3, 40, 5], [4, 2, 60], max_tokens=30, max_sentences=8, seed=0)
    assert sampler.over_cap() == (2, 61)


def test_a_plain_split_file_shadowing_a_different_gz_is_said(corpus_writer, make_data_cfg, toy_splits, caplog,
                                                           tmp_path):
    import gzip

    from seq2seq.data.corpus import load_corpus

    root = corpus_writer(toy_splits)
    (root / "train.de.gz").write_bytes(gzip.compress(b"something else\n"))
    with caplog.at_level(logging.WARNING):
        load_corpus(make_data_cfg())
    assert any("train.de.gz beside it holds different text" in r.getMessage() for r in caplog.records)


def test_a_directory_where_a_corpus_file_should_be_is_named(corpus_writer, make_data_cfg, toy_splits):
    from seq2seq.data.corpus import load_corpus

    root = corpus_writer(toy_splits)
    (root / "valid.en").unlink()
    (root / "valid.en").mkdir()
    with pytest.raises(DataError, match="valid.en is a directory"):
        load_corpus(make_data_cfg())


def test_a_weights_mismatch_names_the_tensors():
    from seq2seq.model.network import build_model, state_mismatch

    small = build_model(ModelConfig(embedding_size=8, encoder_hidden_size=4, decoder_hidden_size=8), 20, 20, 0)
    big = build_model(ModelConfig(embedding_size=16, encoder_hidden_size=4, decoder_hidden_size=8), 20, 20, 0)
    text = state_mismatch(small, big.state_dict())
    assert "encoder.embedding.weight (20, 16) vs (20, 8)" in text


def test_a_read_only_checkpoint_folder_is_not_blamed_on_free_space(prepared, tmp_path, monkeypatch):
    from seq2seq.training.trainer import Trainer

    cache, data = prepared
    trainer = Trainer(smoke_config(cache, "trainer.max_steps=4"), data, tmp_path)

    def refuse(obj, f):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("seq2seq.core.checkpoint.torch.save", refuse)
    with pytest.raises(TrainingError, match="Read-only file system.*make it writable") as info:
        trainer.save()
    assert "free space" not in str(info.value)
