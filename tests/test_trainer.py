"""The training loop in-process: exact resume, graceful stop, non-finite guard, schedules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import smoke_config

from seq2seq.core.config import TeacherForcingSchedule
from seq2seq.core.errors import ConfigError, RunDirError, TrainingError
from seq2seq.training.trainer import Trainer, check_trainer_config, teacher_forcing_ratio


def record_losses(trainer: Trainer) -> list[float]:
    """Wrap train_step so every update's loss is kept."""
    losses: list[float] = []
    original = trainer.train_step

    def step(batch):
        result = original(batch)
        losses.append(math.nan if result.skipped else result.loss)
        return result

    trainer.train_step = step  # type: ignore[method-assign]
    return losses


def test_resume_continues_exactly(prepared, tmp_path: Path) -> None:
    cache, data = prepared
    # An epoch of the smoke corpus is 29 batches: stop mid-epoch (after a validation at 10) and
    # cross an epoch boundary after the resume.
    full_cfg = smoke_config(cache, "trainer.max_steps=36", "trainer.valid_every=10", "trainer.patience=0")
    full = Trainer(full_cfg, data, tmp_path / "full")
    expected = record_losses(full)
    full.fit()

    first_cfg = smoke_config(cache, "trainer.max_steps=10", "trainer.valid_every=10", "trainer.patience=0")
    first = Trainer(first_cfg, data, tmp_path / "split")
    got = record_losses(first)
    first.fit()

    second = Trainer(full_cfg, data, tmp_path / "split")
    second.restore()
    assert second.progress.step == 10
    rest = record_losses(second)
    second.fit()
    assert second.progress.step == 36 and second.progress.epoch == 1
    assert len(expected) == 36
    assert got + rest == pytest.approx(expected, rel=1e-5, abs=1e-6)


def record_validations(trainer: Trainer) -> list[int]:
    """Wrap validate so the step of every validation is kept."""
    steps: list[int] = []
    original = trainer.validate

    def validate(tracker):
        steps.append(trainer.progress.step)
        return original(tracker)

    trainer.validate = validate  # type: ignore[method-assign]
    return steps


def test_valid_each_epoch_validates_at_epoch_ends_once_and_resumes_there(prepared, tmp_path: Path) -> None:
    cache, data = prepared
    # 29 batches an epoch: valid_every=25 and the epoch ends give 25, 29, 50, 58, then the final 60.
    cfg = smoke_config(cache, "trainer.max_steps=60", "trainer.valid_every=25", "trainer.patience=0",
                       "trainer.valid_each_epoch=true")
    full = Trainer(cfg, data, tmp_path / "full")
    expected, validated = record_losses(full), record_validations(full)
    full.fit()
    assert validated == [25, 29, 50, 58, 60]
    # an epoch that ends on a valid_every step is validated once
    once = Trainer(smoke_config(cache, "trainer.max_steps=29", "trainer.valid_every=29", "trainer.patience=0",
                                "trainer.valid_each_epoch=true"), data, tmp_path / "once")
    steps = record_validations(once)
    once.fit()
    assert steps == [29]
    # by default only valid_every and the final state
    plain = Trainer(smoke_config(cache, "trainer.max_steps=60", "trainer.valid_every=25", "trainer.patience=0"),
                    data, tmp_path / "plain")
    steps = record_validations(plain)
    plain.fit()
    assert steps == [25, 50, 60]
    # the checkpoint of the epoch-end validation resumes at the start of the next epoch
    first = Trainer(smoke_config(cache, "trainer.max_steps=null", "trainer.max_epochs=1", "trainer.valid_every=25",
                                 "trainer.patience=0", "trainer.valid_each_epoch=true"), data, tmp_path / "split")
    got, steps = record_losses(first), record_validations(first)
    first.fit()
    assert steps == [25, 29]
    second = Trainer(cfg, data, tmp_path / "split")
    second.restore()
    assert (second.progress.step, second.progress.epoch, second.progress.batch_in_epoch) == (29, 1, 0)
    rest = record_losses(second)
    second.fit()
    assert got + rest == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_resume_with_optimizer_state_of_another_schedule_is_refused_by_name(prepared, tmp_path: Path) -> None:
    """A checkpoint whose schedule state does not fit (the config switched from plateau to a
    per-update schedule between runs) stops with one line naming the checkpoint, not a KeyError."""
    cache, data = prepared
    first = Trainer(smoke_config(cache, "trainer.max_steps=2", "trainer.patience=0", "optim.scheduler=plateau"),
                    data, tmp_path / "run")
    first.fit()
    switched = Trainer(smoke_config(cache, "trainer.max_steps=4", "optim.scheduler=warmup_decay"),
                       data, tmp_path / "run")
    with pytest.raises(RunDirError, match=r"last\.pt|step-2\.pt") as err:
        switched.restore()
    assert "schedule state does not fit" in str(err.value) and "\n" not in str(err.value)


def test_signal_saves_last_and_stops(prepared, tmp_path: Path) -> None:
    cache, data = prepared
    cfg = smoke_config(cache, "trainer.max_steps=30", "trainer.valid_every=100")
    trainer = Trainer(cfg, data, tmp_path)
    original = trainer.train_step

    def step(batch):
        result = original(batch)
        if trainer.progress.step == 6:  # the step about to be counted is the 7th
            trainer._request_stop(15, None)
        return result

    trainer.train_step = step  # type: ignore[method-assign]
    progress = trainer.fit()
    assert progress.step == 7 and not progress.finished
    resumed = Trainer(cfg, data, tmp_path)
    resumed.restore()
    assert resumed.progress.step == 7


def test_non_finite_losses_are_skipped_then_stop_the_run(prepared, tmp_path: Path) -> None:
    cache, data = prepared
    cfg = smoke_config(cache, "trainer.max_steps=30", "trainer.valid_every=100", "trainer.max_nonfinite_steps=3")
    trainer = Trainer(cfg, data, tmp_path)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer._loss = lambda batch, tf: torch.tensor(float("nan"), requires_grad=True)  # type: ignore[method-assign]
    with pytest.raises(TrainingError, match="3 consecutive updates"):
        trainer.fit()
    assert trainer.progress.skipped_steps == 3
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update was applied


def test_non_finite_model_is_never_saved(prepared, tmp_path: Path) -> None:
    cache, data = prepared
    trainer = Trainer(smoke_config(cache), data, tmp_path)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("inf"))
    trainer.save()
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize("schedule", list(TeacherForcingSchedule))
def test_teacher_forcing_schedules(prepared, schedule: TeacherForcingSchedule) -> None:
    cache, _ = prepared
    cfg = smoke_config(cache, "trainer.teacher_forcing=1.0", f"trainer.teacher_forcing_schedule={schedule.value}",
                       "trainer.teacher_forcing_min=0.25", "trainer.teacher_forcing_decay_steps=100",
                       "trainer.teacher_forcing_k=10")
    values = [teacher_forcing_ratio(cfg, s) for s in (0, 50, 100, 10_000)]
    assert all(0.25 <= v <= 1.0 for v in values)
    assert values == sorted(values, reverse=True)  # never increases
    if schedule == TeacherForcingSchedule.constant:
        assert values == [1.0] * 4
    else:
        assert values[-1] == pytest.approx(0.25) and values[0] > 0.9
    if schedule == TeacherForcingSchedule.linear:
        assert values[1] == pytest.approx(0.625)


def test_scheduled_sampling_trains(prepared, tmp_path: Path) -> None:
    cache, data = prepared
    cfg = smoke_config(cache, "trainer.max_steps=4", "trainer.valid_every=4", "trainer.teacher_forcing=0.5",
                       "trainer.evaluate_at_end=false")
    trainer = Trainer(cfg, data, tmp_path)
    losses = record_losses(trainer)
    trainer.fit()
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("override, key", [
    ("optim.lr=nan", "optim.lr"), ("optim.lr=-1", "optim.lr"), ("trainer.max_tokens=0", "trainer.max_tokens"),
    ("trainer.teacher_forcing=1.5", "trainer.teacher_forcing"), ("trainer.label_smoothing=1.0", "trainer.label_smoothing"),
    ("search.beam_size=0", "search.beam_size"), ("trainer.max_steps=-5", "trainer.max_steps"),
    ("trainer.max_minutes=0", "trainer.max_minutes"), ("trainer.max_minutes=-2", "trainer.max_minutes"),
    ("trainer.max_minutes=nan", "trainer.max_minutes"), ("trainer.max_minutes=inf", "trainer.max_minutes"),
])
def test_bad_trainer_values_name_the_key(prepared, override: str, key: str) -> None:
    cache, _ = prepared
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_trainer_config(smoke_config(cache, override))


def test_auto_precision_uses_bf16_only_where_it_is_native(monkeypatch) -> None:
    from seq2seq.core.config import Precision
    from seq2seq.model.devices import autocast_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # forced bf16 where oneDNN has a bf16 LSTM (its refusal elsewhere: test_compat)
    monkeypatch.setattr("seq2seq.model.devices.cpu_runs_bf16_lstm", lambda: True)
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr("seq2seq.model.devices.cpu_has_native_bf16", lambda native=native: native)
        assert autocast_dtype(Precision.auto, cpu) == expected
        assert autocast_dtype(Precision.auto, cuda) == torch.bfloat16
        assert autocast_dtype(Precision.fp32, cpu) is None and autocast_dtype(Precision.fp32, cuda) is None
        assert autocast_dtype(Precision.bf16, cpu) == torch.bfloat16
