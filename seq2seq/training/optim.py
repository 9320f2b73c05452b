"""The optimizer and the learning-rate schedules, built from the typed config.

The reference engine steps with ``torch.optim.Adam`` / ``AdamW`` after ``clip_grad_norm_``; the
fast engine with ``seq2seq.kernels.adam.Adam`` (torch's fused kernel, the clip factor inside it).
Both keep ``torch.optim``'s state-dict layout, so a checkpoint resumes under either. The schedules
set ``param_groups[0]["lr"]``, which both read at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from seq2seq.core.config import OptimizerName, SchedulerName, TrainConfig
from seq2seq.kernels.adam import Adam, clip_scale, gradient_norm

# What the trainer and the schedules use of an optimizer: param_groups, zero_grad, step, and the
# state-dict pair.
Optimizer = Adam | torch.optim.Optimizer


def _lr(optimizer: Optimizer) -> float:
    return optimizer.param_groups[0]["lr"]


def _set_lr(optimizer: Optimizer, lr: float) -> None:
    optimizer.param_groups[0]["lr"] = lr


class StepSchedule:
    """lr = base lr x ``factor(updates so far)``, set after every update (constant, warmup_decay)."""

    def __init__(self, optimizer: Optimizer, factor: Callable[[int], float]) -> None:
        self.optimizer = optimizer
        self.factor = factor
        self.base_lr = _lr(optimizer)
        self.last_epoch = 0  # torch's name for the number of schedule steps taken
        _set_lr(optimizer, self.base_lr * factor(0))

    def after_update(self, time_spent: float = 0.0) -> None:
        """After each update; ``time_spent``, the share of a time budget used, only the cosine reads."""
        self.last_epoch += 1
        _set_lr(self.optimizer, self.base_lr * self.factor(self.last_epoch))

    def after_validation(self, metric: float) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": [self.base_lr], "last_epoch": self.last_epoch}

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """From ``state_dict()`` or from ``torch.optim.lr_scheduler.LambdaLR``."""
        self.base_lr = float(payload["base_lrs"][0])
        self.last_epoch = int(payload["last_epoch"])
        _set_lr(self.optimizer, self.base_lr * self.factor(self.last_epoch))


class PlateauSchedule:
    """Multiply lr by ``factor`` (not below ``min_lr``) once the validation metric (higher is
    better) has not improved by a relative 1e-4 for more than ``patience`` validations in a row:
    ``ReduceLROnPlateau(mode="max")``'s rule."""

    THRESHOLD = 1e-4
    EPS = 1e-8  # smaller lr changes are not made

    def __init__(self, optimizer: Optimizer, factor: float, patience: int, min_lr: float) -> None:
        self.optimizer = optimizer
        self.factor, self.patience, self.min_lr = factor, patience, min_lr
        self.best = -math.inf
        self.num_bad_epochs = 0
        self.last_epoch = 0

    def after_update(self, time_spent: float = 0.0) -> None:
        pass

    def after_validation(self, metric: float) -> None:
        self.last_epoch += 1
        if metric > self.best * (1 + self.THRESHOLD):
            self.best, self.num_bad_epochs = metric, 0
        else:
            self.num_bad_epochs += 1
        if self.num_bad_epochs > self.patience:
            lr = max(_lr(self.optimizer) * self.factor, self.min_lr)
            if _lr(self.optimizer) - lr > self.EPS:
                _set_lr(self.optimizer, lr)
            self.num_bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "num_bad_epochs": self.num_bad_epochs, "last_epoch": self.last_epoch}

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """From ``state_dict()`` or from ``torch.optim.lr_scheduler.ReduceLROnPlateau``."""
        self.best = float(payload["best"])
        self.num_bad_epochs = int(payload["num_bad_epochs"])
        self.last_epoch = int(payload["last_epoch"])



Schedule = StepSchedule | PlateauSchedule  # CosineSchedule is a StepSchedule


def build_optimizer(cfg: TrainConfig, model: nn.Module, fast: bool) -> Optimizer:
    """Adam or AdamW from ``cfg.optim``: ``seq2seq.kernels.adam.Adam`` when ``fast``, else torch's."""
    o = cfg.optim
    decoupled = o.name == OptimizerName.adamw
    if fast:
        return Adam(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
                    decoupled=decoupled)
    torch_adam = torch.optim.AdamW if decoupled else torch.optim.Adam
    return torch_adam(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)


def gradient_norm_of(optimizer: Optimizer, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The 2-norm of all gradients. torch's optimizer: the gradients are clipped to ``max_norm``
    here (``clip_grad_norm_``); the fast Adam clips inside its step (``update``)."""
    if isinstance(optimizer, Adam):
        return gradient_norm(params)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def update(optimizer: Optimizer, norm: torch.Tensor, max_norm: float) -> None:
    """One optimizer step on gradients whose norm before clipping is ``norm``."""
    if isinstance(optimizer, Adam):
        optimizer.step(grad_scale=clip_scale(norm, max_norm))
    else:
        optimizer.step()


def load_optimizer_state(optimizer: Optimizer, payload: dict[str, Any]) -> None:
    """Load a state dict written by either optimizer. Into torch's, the settings that choose its
    implementation (fused, foreach) stay its own, not the writer's."""
    if isinstance(optimizer, Adam):
        optimizer.load_state_dict(payload)
        return
    own = optimizer.param_groups[0]
    groups = payload["param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != len(own["params"]):
        raise ValueError(f"optimizer state for {sum(len(g['params']) for g in groups)} parameters in "
                         f"{len(groups)} group(s); this model has {len(own['params'])} in one")
    group = {**own, **{k: groups[0][k] for k in ("lr", "betas", "eps", "weight_decay") if k in groups[0]},
             "params": list(range(len(own["params"])))}  # a state dict names parameters by index
    state = {int(k): dict(v) for k, v in payload["state"].items()}
    for saved in state.values():
        saved["step"] = torch.as_tensor(saved["step"], dtype=torch.float32).reshape(())
    optimizer.load_state_dict({"state": state, "param_groups": [group]})


def build_scheduler(cfg: TrainConfig, optimizer: Optimizer, total_steps: int | None = None) -> Schedule:
    """The schedule ``cfg.optim.scheduler`` names; ``cosine`` ends at ``total_steps`` (the budget in
    updates) or, with ``trainer.max_minutes``, at the end of the time budget, whichever comes first."""
    o = cfg.optim
    if o.scheduler == SchedulerName.plateau:  # stepped with the validation BLEU
        return PlateauSchedule(optimizer, factor=o.plateau_factor, patience=o.plateau_patience, min_lr=o.min_lr)
    if o.scheduler == SchedulerName.warmup_decay:
        warmup = max(1, o.warmup_steps)
        floor = o.min_lr / o.lr

        def warmup_then_inverse_sqrt(step: int) -> float:
            return max(floor, min((step + 1) / warmup, math.sqrt(warmup / (step + 1))))

        return StepSchedule(optimizer, warmup_then_inverse_sqrt)
    if o.scheduler == SchedulerName.cosine:
        if total_steps is None and cfg.trainer.max_minutes is None:
            raise ValueError("the cosine schedule needs a budget: a number of updates or trainer.max_minutes")
        return CosineSchedule(optimizer, o.warmup_steps, total_steps, o.min_lr / o.lr)
    return StepSchedule(optimizer, lambda _: 1.0)


def _half_cosine(progress: float, floor: float) -> float:
    """From 1 at progress 0 down to ``floor`` at progress 1 (and after it)."""
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class CosineSchedule(StepSchedule):
    """Linear warmup over ``warmup`` updates, then half a cosine from 1 down to ``floor`` at the end
    of the budget (and ``floor`` after it). Decaying to the end of a fixed budget is what a short
    run needs (Li et al. 2020, budgeted training). The budget may be a number of updates
    (``total``), a time budget (the share of it spent, given to ``after_update``), or both: the
    cosine follows whichever is further along, so it reaches ``floor`` when the first budget runs
    out. The warmup counts updates; after it the time share is taken as it stands (not from the
    warmup's end), which is what lets the decay keep pace with a clock that does not wait for
    updates."""

    def __init__(self, optimizer: Optimizer, warmup: int, total: int | None, floor: float) -> None:
        self.total = total
        self.warmup = max(0, warmup if total is None else min(warmup, total - 1))
        self.floor = floor
        self.time_spent = 0.0  # share of trainer.max_minutes spent, 0 without a time budget
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = self.time_spent
        if self.total is not None:
            progress = max(progress, (step - self.warmup) / max(1, self.total - self.warmup))
        return _half_cosine(progress, self.floor)

    def after_update(self, time_spent: float = 0.0) -> None:
        self.time_spent = time_spent
        super().after_update()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "time_spent": self.time_spent}

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        self.time_spent = float(payload.get("time_spent", 0.0))  # absent: a checkpoint from before time budgets
        super().load_state_dict(payload)
