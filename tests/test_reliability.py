"""Reliability: exact resume after SIGKILL, checkpoint rotation and fallback, OOM skips, determinism."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import signal_once_training, smoke_config

from seq2seq.core.checkpoint import load_checkpoint, load_latest, step_checkpoints
from seq2seq.core.errors import CheckpointError, TrainingError
from seq2seq.pipeline import run_training
from seq2seq.training.trainer import Trainer

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------- checkpoint files


def test_keeps_the_newest_k_checkpoints_and_links_last_and_best(prepared, tmp_path: Path) -> None:
    cache, data = prepared
    cfg = smoke_config(cache, "trainer.max_steps=12", "trainer.valid_every=5", "trainer.save_every=2",
                       "trainer.keep_checkpoints=3", "trainer.patience=0")
    Trainer(cfg, data, tmp_path).fit()
    ckpts = tmp_path / "checkpoints"
    best = load_checkpoint(ckpts / "best.pt")
    assert best["progress"]["step"] == best["progress"]["best_step"] in (5, 10, 12)
    # the newest 3, and the best one's step file (trainer.keep_best_checkpoints=1; it shares best.pt's bytes)
    kept = {"step-12.pt", "step-10.pt", "step-8.pt", f"step-{best['progress']['step']}.pt"}
    assert {p.name for p in step_checkpoints(ckpts)} == kept
    assert (ckpts / "best.pt").samefile(ckpts / f"step-{best['progress']['step']}.pt")
    assert (ckpts / "last.pt").samefile(ckpts / "step-12.pt")
    assert load_checkpoint(ckpts / "last.pt")["progress"]["finished"]
    assert not list(ckpts.glob(".*"))  # no temp files


def test_corrupt_last_falls_back_to_the_previous_good_checkpoint(prepared, tmp_path: Path, caplog) -> None:
    cache, data = prepared
    cfg = smoke_config(cache, "trainer.max_steps=9", "trainer.valid_every=100", "trainer.save_every=3")
    Trainer(cfg, data, tmp_path).fit()
    ckpts = tmp_path / "checkpoints"
    last = ckpts / "last.pt"
    with open(last, "r+b") as f:  # truncate in place: step-9.pt shares these bytes
        f.truncate(last.stat().st_size // 2)
    resumed = Trainer(cfg, data, tmp_path)
    with caplog.at_level(logging.WARNING):
        assert resumed.restore() == ckpts / "step-6.pt"
    assert resumed.progress.step == 6
    assert "last.pt: truncated or corrupt checkpoint" in caplog.text

    for path in step_checkpoints(ckpts):
        path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*last\.pt: refused to load: corrupt"):
        load_latest(ckpts)


def test_a_kill_inside_a_checkpoint_write_leaves_the_old_files(prepared, tmp_path: Path, monkeypatch) -> None:
    cache, data = prepared
    cfg = smoke_config(cache, "trainer.max_steps=4", "trainer.valid_every=100", "trainer.save_every=2")
    trainer = Trainer(cfg, data, tmp_path)
    trainer.fit()
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()

    def crash(src, dst):
        raise KeyboardInterrupt  # stands in for a kill between writing and renaming

    monkeypatch.setattr("seq2seq.core.checkpoint.os.replace", crash)
    trainer.progress.step = 6
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before
    assert not (tmp_path / "checkpoints" / "step-6.pt").exists()
    assert not list((tmp_path / "checkpoints").glob(".*"))


# ----------------------------------------------------------------------------- out of memory


def test_out_of_memory_batches_are_skipped_counted_and_logged(prepared, tmp_path: Path, caplog) -> None:
    cache, data = prepared
    cfg = smoke_config(cache, "trainer.max_steps=8", "trainer.valid_every=100")
    trainer = Trainer(cfg, data, tmp_path)
    original = trainer._loss
    calls = {"n": 0}

    def loss(batch, tf):
        calls["n"] += 1
        if calls["n"] in (3, 4):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(batch, tf)

    trainer._loss = loss  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        progress = trainer.fit()
    assert progress.finished and progress.step == 8
    assert progress.oom_steps == 2 and progress.skipped_steps == 0
    warnings = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 2
    assert "sentences (source" in warnings[0] and "target tokens" in warnings[0]
    assert "lower trainer.max_tokens" in warnings[0]


def test_out_of_memory_on_every_batch_stops_with_a_clear_error(prepared, tmp_path: Path) -> None:
    cache, data = prepared
    cfg = smoke_config(cache, "trainer.max_steps=30", "trainer.valid_every=100", "trainer.max_oom_steps=3")
    trainer = Trainer(cfg, data, tmp_path)

    def loss(batch, tf):
        raise torch.OutOfMemoryError("out of memory")

    trainer._loss = loss  # type: ignore[method-assign]
    with pytest.raises(TrainingError, match="3 consecutive batches ran out of memory.*lower trainer.max_tokens"):
        trainer.fit()


# ----------------------------------------------------------------------------- determinism


def _comparable_report(path: Path) -> dict:
    report = json.loads(path.read_text(encoding="utf-8"))
    report.pop("created")
    report.pop("checkpoint")
    report["speed"].pop("decode_seconds")  # the clock, not the computation
    report["speed"].pop("sentences_per_s")
    return report


def test_same_seed_gives_identical_checkpoints_and_reports(prepared, tmp_path: Path) -> None:
    cache, _ = prepared
    cfg = smoke_config(cache, "trainer.max_steps=12", "trainer.valid_every=6", "eval.bootstrap_samples=200",
                       "eval.heatmaps=0")
    for name in ("a", "b"):
        run_training(cfg, tmp_path / name)
    a, b = (load_checkpoint(tmp_path / name / "checkpoints" / "last.pt") for name in ("a", "b"))
    for key in ("model", "optimizer", "rng"):
        assert _same(a[key], b[key]), key
    times = ("train_seconds", "wall_seconds")  # the clock, not the computation
    assert {k: v for k, v in a["progress"].items() if k not in times} == {
        k: v for k, v in b["progress"].items() if k not in times}
    assert _comparable_report(tmp_path / "a" / "eval" / "test" / "report.json") == _comparable_report(
        tmp_path / "b" / "eval" / "test" / "report.json")
    assert (tmp_path / "a" / "eval" / "test" / "hyps.txt").read_bytes() == (
        tmp_path / "b" / "eval" / "test" / "hyps.txt").read_bytes()


def _same(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return isinstance(y, (list, tuple)) and len(x) == len(y) and all(map(_same, x, y))
    return x == y


# ----------------------------------------------------------------------------- SIGKILL and resume

# 36 updates cross the smoke corpus' epoch boundary (29 batches); checkpoints every 5 updates and at
# each validation (every 12).
KILL_RUN = ["experiment=smoke", "trainer.max_steps=36", "trainer.valid_every=12", "trainer.save_every=5",
            "trainer.log_every=1", "trainer.patience=0", "trainer.valid_max_sentences=8", "model.dropout=0.1",
            "trainer.evaluate_at_end=false"]


def _env(cache: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "SEQ2SEQ_CACHE": str(cache),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("SEQ2SEQ_DEBUG", None)
    return env


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """Every (step, value) logged for ``tag``, across all event files, in the order written."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    found = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == tag:
                    found.append((event.step, value.simple_value))
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prepared) -> Path:
    cache, _ = prepared
    run_dir = tmp_path_factory.mktemp("full") / "run"
    proc = subprocess.run([str(BIN / "seq2seq-train"), *KILL_RUN, f"hydra.run.dir={run_dir}"], env=_env(cache),
                          cwd=run_dir.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "at", "resumes_from"), [
    ("step", 17, 15),  # mid-interval: 2 updates lost
    ("valid", 24, 20),  # while validating: the validation's checkpoint was never written
    ("save", 30, 25),  # inside a checkpoint write, after crossing the epoch boundary at 29
])
def test_sigkill_then_resume_logs_the_same_losses(prepared, uninterrupted, tmp_path, kind, at, resumes_from) -> None:
    cache, _ = prepared
    run_dir = tmp_path / "run"
    env = _env(cache)
    killed = subprocess.run([sys.executable, str(HERE / "kill_during.py"), kind, str(at), *KILL_RUN,
                             f"hydra.run.dir={run_dir}"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert load_latest(run_dir / "checkpoints")[1]["progress"]["step"] == resumes_from

    resumed = subprocess.run([str(BIN / "seq2seq-train"), f"trainer.resume={run_dir}"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {resumes_from}" in (run_dir / "train.log").read_text(encoding="utf-8")

    for tag in ("train/loss", "train/grad_norm", "valid/loss", "valid/bleu"):
        expected = dict(_scalars(uninterrupted, tag))
        got = _scalars(run_dir, tag)
        assert {step for step, _ in got} == set(expected), tag
        for step, value in got:  # before the kill, re-done after the resume, and the rest
            assert value == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (tag, step)
    final = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    reference = load_checkpoint(uninterrupted / "checkpoints" / "last.pt")
    assert final["progress"]["step"] == 36 and final["progress"]["finished"]
    for name, tensor in reference["model"].items():
        torch.testing.assert_close(final["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert not list((run_dir / "checkpoints").glob(".*"))  # the half-written temp file was cleaned up


def test_resuming_a_finished_run_says_so(prepared, uninterrupted, tmp_path) -> None:
    cache, _ = prepared
    before = {p.name: p.stat().st_mtime_ns for p in (uninterrupted / "checkpoints").iterdir()}
    proc = subprocess.run([str(BIN / "seq2seq-train"), f"trainer.resume={uninterrupted}"], env=_env(cache),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already finished at step 36" in proc.stderr + proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (uninterrupted / "checkpoints").iterdir()} == before


# ----------------------------------------------------------------------------- full disk


def test_a_full_disk_is_detected_before_training(prepared, tmp_path: Path, monkeypatch) -> None:
    import shutil

    from seq2seq.core.errors import RunDirError

    cache, _ = prepared
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("seq2seq.pipeline.shutil.disk_usage", lambda _: usage._replace(free=2**20))
    cfg = smoke_config(cache, "trainer.max_steps=4")
    with pytest.raises(RunDirError, match=r"has 1 MB free but checkpoints of this model need about \d+ MB"):
        run_training(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_disk_that_fills_up_during_training_stops_with_a_clear_error(prepared, tmp_path: Path,
                                                                       monkeypatch) -> None:
    import errno

    cache, data = prepared
    cfg = smoke_config(cache, "trainer.max_steps=10", "trainer.valid_every=100", "trainer.save_every=3")
    trainer = Trainer(cfg, data, tmp_path)
    original = torch.save

    def save(obj, f):
        if obj["progress"]["step"] == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f)

    monkeypatch.setattr("seq2seq.core.checkpoint.torch.save", save)
    with pytest.raises(TrainingError, match=r"cannot write a checkpoint .* at step 6 \(No space left on device\)"):
        trainer.fit()
    monkeypatch.undo()
    assert load_latest(tmp_path / "checkpoints")[1]["progress"]["step"] == 3  # the earlier one is intact
    assert not list((tmp_path / "checkpoints").glob(".*"))


# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_saves_exits_0_and_says_how_to_resume(prepared, tmp_path, sig) -> None:
    cache, _ = prepared
    run_dir = tmp_path / "run"
    args = ["experiment=smoke", "trainer.max_steps=100000", "trainer.valid_every=100000", "trainer.log_every=1",
            f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([str(BIN / "seq2seq-train"), *args], env=_env(cache), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = signal_once_training(proc, run_dir / "train.log", sig)
    assert proc.returncode == 0, err[-3000:]
    assert f"continue with: seq2seq-train trainer.resume={run_dir}" in out + err
    step = load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]["step"]
    assert step >= 3
    resumed = subprocess.run([str(BIN / "seq2seq-train"), f"trainer.resume={run_dir}",
                              f"trainer.max_steps={step + 2}", "trainer.evaluate_at_end=false"],
                             env=_env(cache), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["progress"]["step"] == step + 2
