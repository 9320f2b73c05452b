"""Our Adam/AdamW and learning-rate schedules against torch.optim's, step for step, and their
state dicts in both directions (checkpoints written with torch.optim still resume)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from seq2seq.training.optim import (
    Adam,
    PlateauSchedule,
    StepSchedule,
    clip_scale,
    gradient_norm,
)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in ((5, 3), (7,), (2, 2, 4))]


def _grads(params: list[torch.nn.Parameter], step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _run(opt, params, steps: range, skip: int | None = None) -> None:
    for t in steps:
        for i, (p, grad) in enumerate(zip(params, _grads(params, t))):
            p.grad = None if i == skip and t % 2 else grad.clone()  # one tensor without grad at odd steps
        opt.step()


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("fused", [True, False])
def test_adam_matches_torch_optim(decoupled: bool, weight_decay: float, fused: bool):
    ours, theirs = _params(), _params()
    opt = Adam(ours, lr=0.01, betas=(0.8, 0.95), weight_decay=weight_decay, decoupled=decoupled)
    opt.fused = fused  # False: the one-tensor-at-a-time path
    reference = (torch.optim.AdamW if decoupled else torch.optim.Adam)(
        theirs, lr=0.01, betas=(0.8, 0.95), weight_decay=weight_decay, foreach=False)
    _run(opt, ours, range(6), skip=1)
    _run(reference, theirs, range(6), skip=1)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for p, state in zip(theirs, opt.state):
        assert float(state["step"]) == float(reference.state[p]["step"])


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipped, and left alone
@pytest.mark.parametrize("fused", [True, False])
def test_clipping_inside_the_step_matches_clip_grad_norm(max_norm: float, fused: bool):
    ours, theirs = _params(), _params()
    opt = Adam(ours, lr=0.01, weight_decay=0.01)
    opt.fused = fused
    reference = torch.optim.Adam(theirs, lr=0.01, weight_decay=0.01, foreach=False)
    for t in range(4):
        for a, b, grad in zip(ours, theirs, _grads(ours, t)):
            a.grad, b.grad = grad * 3, grad * 3
        norm = gradient_norm(ours)
        expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        torch.testing.assert_close(norm, expected)
        opt.step(grad_scale=clip_scale(norm, max_norm))
        reference.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_gradient_norm_skips_missing_grads_and_shows_non_finite():
    params = _params()
    assert float(gradient_norm(params)) == 0.0
    params[1].grad = torch.full((7,), 2.0)
    assert float(gradient_norm(params)) == pytest.approx(math.sqrt(7 * 4))
    params[0].grad = torch.full((5, 3), float("nan"))
    assert not math.isfinite(float(gradient_norm(params)))


def test_zero_grad_and_no_grads_are_no_ops():
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = Adam(params, lr=0.1)
    opt.step()  # nothing has a gradient yet
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and not opt.state_dict()["state"]
    params[0].grad = torch.ones_like(params[0])
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("source", ["ours", "torch"])
def test_state_dict_resumes_exactly(source: str):
    """Three steps, a state dict (ours, or torch.optim's as older checkpoints hold), three more
    steps in a fresh optimizer: the same parameters as six steps without a break."""
    straight = _params()
    opt = Adam(straight, lr=0.01, weight_decay=0.01)
    _run(opt, straight, range(6))

    first = _params()
    if source == "ours":
        writer = Adam(first, lr=0.01, weight_decay=0.01)
    else:
        writer = torch.optim.Adam(first, lr=0.01, weight_decay=0.01, foreach=False)
    _run(writer, first, range(3))
    saved = writer.state_dict()
    resumed = _params()
    with torch.no_grad():
        for p, q in zip(resumed, first):
            p.copy_(q)
    reader = Adam(resumed, lr=0.5)  # the settings come from the state dict
    reader.load_state_dict(saved)
    assert (reader.lr, reader.weight_decay) == (0.01, 0.01)
    _run(reader, resumed, range(3, 6))
    for a, b in zip(resumed, straight):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # and ours loads into torch.optim
    if source == "ours":
        torch.optim.Adam(_params(), lr=0.01).load_state_dict(saved)


def test_state_dict_for_another_model_is_refused():
    opt = Adam(_params(), lr=0.01)
    _run(opt, opt.params, range(1))
    other = Adam(_params()[:2], lr=0.01)
    with pytest.raises(ValueError, match="3 parameters"):
        other.load_state_dict(opt.state_dict())
    wrong = Adam([torch.nn.Parameter(torch.zeros(3, 5)), *_params()[1:]], lr=0.01)
    with pytest.raises(ValueError, match="shape"):
        wrong.load_state_dict(opt.state_dict())


def _factor(step: int) -> float:
    return max(0.1, min((step + 1) / 4, math.sqrt(4 / (step + 1))))


def test_step_schedule_matches_lambda_lr_and_resumes():
    opt = Adam(_params(), lr=0.02)
    reference_opt = torch.optim.Adam(_params(), lr=0.02)
    schedule = StepSchedule(opt, _factor)
    reference = torch.optim.lr_scheduler.LambdaLR(reference_opt, _factor)
    lrs, expected = [opt.lr], [reference_opt.param_groups[0]["lr"]]
    for _ in range(12):
        schedule.after_update()
        schedule.after_validation(1.0)  # no effect on a per-update schedule
        reference_opt.step()
        reference.step()
        lrs.append(opt.lr)
        expected.append(reference_opt.param_groups[0]["lr"])
    assert lrs == pytest.approx(expected, rel=1e-12)
    for saved in (schedule.state_dict(), reference.state_dict()):
        fresh_opt = Adam(_params(), lr=0.02)
        fresh = StepSchedule(fresh_opt, _factor)
        fresh.load_state_dict(saved)
        assert fresh_opt.lr == pytest.approx(opt.lr, rel=1e-12) and fresh.last_epoch == 12


def test_plateau_schedule_matches_reduce_lr_on_plateau():
    bleus = [10.0, 12.0, 12.0, 11.0, 12.0005, 9.0, 13.0, 13.0, 13.0, 13.0, 13.0, 13.0, 13.0, 13.0, 13.0]
    opt = Adam(_params(), lr=0.01)
    reference_opt = torch.optim.Adam(_params(), lr=0.01)
    schedule = PlateauSchedule(opt, factor=0.5, patience=1, min_lr=0.002)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(reference_opt, mode="max", factor=0.5, patience=1,
                                                           min_lr=0.002)
    for i, bleu in enumerate(bleus):
        schedule.after_update()  # no effect on a per-validation schedule
        schedule.after_validation(bleu)
        reference.step(bleu)
        assert opt.lr == pytest.approx(reference_opt.param_groups[0]["lr"]), f"validation {i}"
    assert opt.lr == pytest.approx(0.002)  # the floor was reached
    fresh = PlateauSchedule(Adam(_params(), lr=0.01), factor=0.5, patience=1, min_lr=0.002)
    fresh.load_state_dict(reference.state_dict())
    assert (fresh.best, fresh.num_bad_epochs) == (schedule.best, schedule.num_bad_epochs)


def test_building_the_trainer_optimizer_does_not_import_dynamo():
    """The point of not using torch.optim: no TorchDynamo import (tens of MB, a second)."""
    code = ("import sys, torch\n"
            "from seq2seq.training.optim import Adam, StepSchedule\n"
            "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
            "opt = Adam([p], lr=0.1); StepSchedule(opt, lambda _: 1.0).after_update(); opt.step()\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(("writer_fast", "reader_fast"), [(True, False), (False, True)], ids=["fast-to-torch", "torch-to-fast"])
def test_either_engines_optimizer_resumes_from_the_others_state(writer_fast: bool, reader_fast: bool):
    """A checkpoint's optimizer state from one engine continues exactly under the other, with the
    trainer's own clipping and update path (gradient_norm_of, update)."""
    from types import SimpleNamespace

    from seq2seq.core.config import OptimConfig
    from seq2seq.training.optim import (
        build_optimizer,
        gradient_norm_of,
        load_optimizer_state,
        update,
    )

    cfg = SimpleNamespace(optim=OptimConfig(lr=0.01, weight_decay=0.01))

    def steps(opt, params, span):
        for t in span:
            for p, grad in zip(params, _grads(params, t)):
                p.grad = grad.clone() * 3.0  # norms above clip_norm: clipping matters
            update(opt, gradient_norm_of(opt, params, max_norm=1.0), max_norm=1.0)

    straight = torch.nn.ParameterList(_params())
    steps(build_optimizer(cfg, straight, fast=reader_fast), list(straight), range(6))
    first = torch.nn.ParameterList(_params())
    writer = build_optimizer(cfg, first, fast=writer_fast)
    steps(writer, list(first), range(3))
    resumed = torch.nn.ParameterList(_params())
    with torch.no_grad():
        for p, q in zip(resumed, first):
            p.copy_(q)
    reader = build_optimizer(cfg, resumed, fast=reader_fast)
    load_optimizer_state(reader, writer.state_dict())
    steps(reader, list(resumed), range(3, 6))
    for a, b in zip(resumed, straight):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def cosine_lrs(warmup: int, total: int, floor: float, updates: int) -> list[float]:
    """The learning rate (base 1) before the first update and after each of ``updates`` updates."""
    from seq2seq.training.optim import CosineSchedule

    opt = Adam([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    schedule = CosineSchedule(opt, warmup=warmup, total=total, floor=floor)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(updates):
        schedule.after_update()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_cosine_warms_up_then_decays_to_the_floor_at_the_end_of_the_budget():
    f = cosine_lrs(warmup=4, total=24, floor=0.01, updates=100)
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[14] == pytest.approx(0.01 + 0.99 * 0.5)  # half-way through the decay
    assert f[24] == pytest.approx(0.01) and f[100] == pytest.approx(0.01)
    decay = f[4:25]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert cosine_lrs(warmup=0, total=10, floor=0.0, updates=0) == pytest.approx([1.0])


def test_the_cosine_schedule_spans_the_trainers_budget(prepared, tmp_path):
    from conftest import smoke_config

    from seq2seq.training.trainer import Trainer

    cache, data = prepared
    cfg = smoke_config(cache, "trainer.max_steps=null", "trainer.max_epochs=2", "optim.scheduler=cosine",
                       "optim.warmup_steps=5", "optim.lr=0.01", "optim.min_lr=0.0001", "trainer.valid_every=100")
    trainer = Trainer(cfg, data, tmp_path / "run")
    assert trainer.total_steps() == 2 * trainer.batches_per_epoch
    trainer.fit()
    assert trainer.progress.step == trainer.total_steps() and trainer.ended_by() == "trainer.max_epochs"
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0001)


def test_cosine_with_a_time_budget_follows_the_share_spent_or_the_updates_whichever_is_further():
    from seq2seq.training.optim import CosineSchedule

    opt = Adam([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    by_time = CosineSchedule(opt, warmup=2, total=None, floor=0.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # warmup counts updates, whatever the clock
    by_time.after_update(time_spent=0.9)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    for share, lr in ((0.0, 1.0), (0.5, 0.5), (1.0, 0.0), (3.0, 0.0)):
        by_time.after_update(time_spent=share)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, abs=1e-12)
    opt = Adam([torch.nn.Parameter(torch.zeros(2))], lr=1.0)  # the schedule's base lr is the optimizer's
    both = CosineSchedule(opt, warmup=0, total=10, floor=0.1)
    for _ in range(5):
        both.after_update(time_spent=0.1)  # the updates are further along: half-way
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 + 0.9 * 0.5)
    both.after_update(time_spent=1.0)  # the clock ran out first
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    # resumes where it was, and reads a cosine's state from before time budgets
    state = both.state_dict()
    again = CosineSchedule(opt, warmup=0, total=10, floor=0.1)
    again.load_state_dict(state)
    assert again.time_spent == 1.0 and opt.param_groups[0]["lr"] == pytest.approx(0.1)
    again.load_state_dict({"base_lrs": [1.0], "last_epoch": 5})
    assert again.time_spent == 0.0 and opt.param_groups[0]["lr"] == pytest.approx(0.55)


class _Clock:
    """A perf_counter that moves one second per reading: the trainer's time budget without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def test_a_time_budget_ends_training_validates_and_resumes_with_the_time_spent(prepared, tmp_path, monkeypatch):
    from conftest import smoke_config

    from seq2seq.training import trainer as trainer_module
    from seq2seq.training.trainer import Trainer

    monkeypatch.setattr(trainer_module, "time", _Clock())
    cache, data = prepared
    common = ("trainer.max_steps=null", "trainer.max_epochs=null", "optim.scheduler=cosine", "optim.warmup_steps=0",
              "optim.lr=0.01", "optim.min_lr=0.0001", "trainer.valid_every=1000", "trainer.evaluate_at_end=false")
    cfg = smoke_config(cache, *common, "trainer.max_minutes=0.5")
    trainer = Trainer(cfg, data, tmp_path / "run")
    assert trainer.total_steps() is None
    p = trainer.fit()
    assert p.finished and 30.0 <= p.wall_seconds < 40.0 and 3 <= p.step < 30
    assert p.validations[-1][0] == p.step  # the final state is validated
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0001)  # the cosine ended with the time
    assert trainer.ended_by() == "trainer.max_minutes"
    first = p.step

    longer = smoke_config(cache, *common, "trainer.max_minutes=1")
    resumed = Trainer(longer, data, tmp_path / "run")
    resumed.restore()
    assert resumed.progress.wall_seconds == pytest.approx(p.wall_seconds)
    q = resumed.fit()
    # it went on from the time already spent, not from zero: about as many updates again
    assert q.finished and 60.0 <= q.wall_seconds < 70.0 and first < q.step < 3 * first
