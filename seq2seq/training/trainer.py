"""The training loop: teacher forcing, validation with greedy BLEU, early stopping, checkpoints.

Knows nothing about Hydra: it takes a typed ``TrainConfig``, prepared data and a run directory.
"""

from __future__ import annotations

import errno
import io
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from seq2seq.core.checkpoint import (
    bytes_to_tensor,
    load_latest,
    remove_partial_writes,
    save_step_checkpoint,
)
from seq2seq.core.config import TeacherForcingSchedule, TrainConfig, as_plain_dict
from seq2seq.core.errors import ConfigError, RunDirError, TrainingError
from seq2seq.core.rng import rng_state, seed_everything, set_rng_state
from seq2seq.core.tracking import NullTracker, Tracker
from seq2seq.data.batching import Batch, TokenBatchSampler, collate
from seq2seq.data.prepare import PreparedData, token_ids
from seq2seq.data.tokenizer import PAD_ID
from seq2seq.evaluation.metrics import corpus_score
from seq2seq.model.devices import autocast_dtype, check_num_threads, resolve_device
from seq2seq.model.engine import build_engine, describe_engine
from seq2seq.model.losses import coverage_penalty
from seq2seq.model.network import Seq2Seq, build_model, count_parameters, state_mismatch
from seq2seq.search.common import check_search_config
from seq2seq.search.translate import translate_ids
from seq2seq.training.distributed import (
    Dist,
    PeerLost,
    ReportedByPrimary,
    rank_device,
    threads_per_rank,
)
from seq2seq.training.optim import (
    build_optimizer,
    build_scheduler,
    gradient_norm_of,
    load_optimizer_state,
    update,
)

log = logging.getLogger(__name__)


def teacher_forcing_ratio(cfg: TrainConfig, step: int) -> float:
    """Probability of feeding the gold previous word at ``step`` (Bengio et al. 2015)."""
    t = cfg.trainer
    if t.teacher_forcing_schedule == TeacherForcingSchedule.constant:
        return t.teacher_forcing
    if t.teacher_forcing_schedule == TeacherForcingSchedule.linear:
        frac = min(1.0, step / max(1, t.teacher_forcing_decay_steps))
        return max(t.teacher_forcing_min, t.teacher_forcing - frac * (t.teacher_forcing - t.teacher_forcing_min))
    k = t.teacher_forcing_k
    return max(t.teacher_forcing_min, t.teacher_forcing * k / (k + math.exp(min(step / k, 700.0))))


def check_trainer_config(cfg: TrainConfig) -> None:
    t, o = cfg.trainer, cfg.optim
    check_search_config(cfg.search)
    positive = {"trainer.max_tokens": t.max_tokens, "trainer.max_sentences": t.max_sentences,
                "trainer.valid_every": t.valid_every, "trainer.log_every": t.log_every,
                "trainer.keep_checkpoints": t.keep_checkpoints,
                "trainer.keep_best_checkpoints": t.keep_best_checkpoints,
                "trainer.max_nonfinite_steps": t.max_nonfinite_steps, "trainer.max_oom_steps": t.max_oom_steps}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be a positive integer (got {value})")
    for key, value in (("trainer.max_steps", t.max_steps), ("trainer.max_epochs", t.max_epochs),
                       ("trainer.save_every", t.save_every)):
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be a positive integer or null (got {value})")
    if t.max_minutes is not None and not (math.isfinite(t.max_minutes) and t.max_minutes > 0):
        raise ConfigError(f"trainer.max_minutes must be a positive number of minutes or null (got {t.max_minutes})")
    if t.max_steps is None and t.max_epochs is None and t.max_minutes is None:
        raise ConfigError("set trainer.max_steps, trainer.max_epochs or trainer.max_minutes; with none of them, "
                          "training never ends")
    autocast_dtype(t.precision, resolve_device(t.device))  # bf16 on a CPU that cannot: refused now
    if not (math.isfinite(o.lr) and o.lr > 0):
        raise ConfigError(f"optim.lr must be a positive number (got {o.lr})")
    if not (math.isfinite(o.clip_norm) and o.clip_norm > 0):
        raise ConfigError(f"optim.clip_norm must be a positive number (got {o.clip_norm})")
    for key, value in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1) (got {value})")
    for key, value in (("optim.weight_decay", o.weight_decay), ("optim.min_lr", o.min_lr)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{key} must be a non-negative number (got {value})")
    if not 0.0 < o.plateau_factor < 1.0:
        raise ConfigError(f"optim.plateau_factor must be in (0, 1) (got {o.plateau_factor})")
    for key, value in (("optim.plateau_patience", o.plateau_patience), ("optim.warmup_steps", o.warmup_steps)):
        if value < 0:
            raise ConfigError(f"{key} must be 0 or a positive integer (got {value})")
    for key, value in (("trainer.teacher_forcing", t.teacher_forcing),
                       ("trainer.teacher_forcing_min", t.teacher_forcing_min)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1] (got {value})")
    if not (math.isfinite(t.teacher_forcing_k) and t.teacher_forcing_k > 0):
        raise ConfigError(f"trainer.teacher_forcing_k must be a positive number (got {t.teacher_forcing_k})")
    if t.valid_max_sentences is not None and t.valid_max_sentences < 1:
        raise ConfigError(f"trainer.valid_max_sentences must be a positive integer or null (got {t.valid_max_sentences})")
    if t.patience < 0:
        raise ConfigError(f"trainer.patience must be 0 (never stop early) or positive (got {t.patience})")
    if not 0.0 <= t.label_smoothing < 1.0:
        raise ConfigError(f"trainer.label_smoothing must be in [0, 1) (got {t.label_smoothing})")
    if not (math.isfinite(t.coverage_loss) and t.coverage_loss >= 0):
        raise ConfigError(f"trainer.coverage_loss must be 0 (off) or a positive number (got {t.coverage_loss})")
    if t.coverage_loss_start < 0:
        raise ConfigError(f"trainer.coverage_loss_start must be 0 (from the first update) or a later update "
                          f"(got {t.coverage_loss_start})")
    if t.coverage_loss > 0 and cfg.model.attention.type.value == "none":
        raise ConfigError("trainer.coverage_loss penalises attention; model/attention=none has none")
    check_num_threads(t.num_threads, "trainer.num_threads")


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resumed run continues exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    best_bleu: float = -1.0
    best_step: int = 0
    bad_validations: int = 0
    skipped_steps: int = 0
    consecutive_skipped: int = 0
    oom_steps: int = 0
    consecutive_oom: int = 0
    train_seconds: float = 0.0  # in updates, the time tokens/s is measured over
    wall_seconds: float = 0.0  # of the training loop, validations included: what trainer.max_minutes counts
    train_tokens: int = 0  # target tokens over all ranks
    finished: bool = False
    world_size: int = 1  # ranks that trained: batch_in_epoch counts updates of that many batches
    # The log window in progress: saved so a resumed run logs the same mean losses.
    window_loss: float = 0.0
    window_norm: float = 0.0
    window_tokens: int = 0
    window_steps: int = 0
    validations: list = field(default_factory=list)  # [step, valid BLEU] of every validation so far


def _to_bytes(value: Any) -> bytes:
    """``value`` as ``torch.save`` writes it: tensors inside pickled objects do not cross
    ``all_gather_object`` intact, bytes do."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


SKIPPED_NONFINITE = "non-finite"
SKIPPED_OOM = "out of memory"


@dataclass(frozen=True)
class StepResult:
    """What one update did: its loss and gradient norm, or why it was skipped. With several
    ranks every field is the same on all of them (decided in the update's collective)."""

    loss: float = math.nan
    grad_norm: float = math.nan
    skipped: str | None = None  # SKIPPED_NONFINITE or SKIPPED_OOM
    tokens: int = 0  # target tokens of the update, over all ranks
    stop: bool = False  # a signal reached a rank: save and stop after this update
    wall_seconds: float = 0.0  # the run's training time when the update ended (with several ranks, their mean)


class Trainer:
    def __init__(self, cfg: TrainConfig, data: PreparedData, run_dir: Path, dist: Dist | None = None) -> None:
        check_trainer_config(cfg)
        self.cfg = cfg
        self.data = data
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.dist = dist or Dist.single()
        self.stop_signal: int | None = None
        self.device = rank_device(resolve_device(cfg.trainer.device), self.dist.local_rank)
        if self.device.type == "cpu":
            torch.set_num_threads(threads_per_rank(cfg.trainer.num_threads, self.dist.local_world_size)
                                  if self.dist.distributed else cfg.trainer.num_threads or torch.get_num_threads())
        self.amp_dtype = autocast_dtype(cfg.trainer.precision, self.device)
        seed_everything(cfg.seed)
        tok = data.tokenizer
        self.model: Seq2Seq = build_model(cfg.model, tok.src_vocab_size, tok.tgt_vocab_size, PAD_ID).to(self.device)
        self.engine = build_engine(self.model, cfg.trainer.kernels, self.device)
        self.params = list(self.model.parameters())
        self.dist.broadcast_parameters(self.params)  # the same seed gave the same weights; now it is certain
        if self.dist.rank:  # every rank its own dropout and sampling stream; rank 0 keeps a single run's
            seed_everything(cfg.seed + 7919 * self.dist.rank)
        self._flat: torch.Tensor | None = None  # the gradient all-reduce buffer (several ranks only)
        self.optimizer = build_optimizer(cfg, self.model, fast=self.engine.name == "fast")
        self.train_src = token_ids(data.train, "src_ids")
        self.train_tgt = token_ids(data.train, "tgt_ids")
        relative = getattr(self.model.decoder.attention, "relative", None)
        if relative is not None:  # the expected source position of step t is t * rho (a resume restores it)
            rho = (self.train_src.lengths().sum() + len(self.train_src)) / max(1, self.train_tgt.lengths().sum()
                                                                                + len(self.train_tgt))
            relative.length_ratio.fill_(float(rho))
        self.sampler = TokenBatchSampler(self.train_src.lengths(), self.train_tgt.lengths(),
                                         cfg.trainer.max_tokens, cfg.trainer.max_sentences, cfg.seed)
        world = self.dist.world_size
        self.batches_per_epoch = len(self.sampler) // world  # updates per epoch: one batch per rank each
        if self.batches_per_epoch == 0:
            raise ConfigError(f"the training set makes {len(self.sampler)} batch(es) of trainer.max_tokens="
                              f"{cfg.trainer.max_tokens}, fewer than the {world} ranks; lower trainer.max_tokens "
                              "or start fewer ranks")
        over, longest = self.sampler.over_cap()
        if over and self.dist.is_primary:
            log.warning("trainer.max_tokens=%d is below %d training sentence(s) (the longest takes %d tokens with "
                        "padding): each gets a batch of its own, over the cap; raise trainer.max_tokens or lower "
                        "data.max_len", cfg.trainer.max_tokens, over, longest)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total_steps())
        self.progress = Progress(world_size=world)
        self._clock_origin = time.perf_counter()  # wall_seconds = now - origin; _fit moves it on resume
        self.num_parameters = count_parameters(self.model)
        log.info("model %s: %s parameters; %d training pairs in %d batches per epoch (%.1f%% padding)",
                 self.model.description, f"{self.num_parameters:,}", len(self.train_src),
                 self.batches_per_epoch, 100 * self.sampler.padding_fraction(0))
        if self.dist.distributed:
            left = len(self.sampler) % world
            log.info("data parallel over %d ranks: trainer.max_tokens=%d per rank, so up to %d tokens (padding "
                     "included) per update; each rank takes %d of the %d batches per epoch%s", world,
                     cfg.trainer.max_tokens, world * cfg.trainer.max_tokens, self.batches_per_epoch,
                     len(self.sampler), f" ({left} left over, different ones each epoch)" if left else "")
        log.info("device %s, %s", self.device, "bf16 autocast" if self.amp_dtype else "float32")
        log.info("%s", describe_engine(self.engine))

    # ------------------------------------------------------------------ checkpoints

    def state_payload(self) -> dict[str, Any]:
        tok = self.data.tokenizer
        return {
            "config": as_plain_dict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": {},  # bf16 autocast needs no loss scaling; kept for a stable layout
            "progress": asdict(self.progress),
            "rng": rng_state(),
            "vocab": {"src": tok.src_vocab_size, "tgt": tok.tgt_vocab_size},
            "tokenizer": {"src": bytes_to_tensor(tok.src_proto),
                          "tgt": bytes_to_tensor(tok.tgt_proto) if tok.tgt_proto is not None else None},
            "model_description": self.model.description,
            "num_parameters": self.num_parameters,
        }

    def _model_is_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def save(self, best: bool = False) -> None:
        """Write ``step-<N>.pt`` and point ``last.pt`` (and ``best.pt`` when ``best``) at it.
        Every rank calls it (each rank's RNG state goes in); rank 0 alone writes."""
        if not self._model_is_finite():  # the same weights on every rank, so the same answer
            if self.dist.is_primary:
                log.error("model weights are not finite at step %d; no checkpoint written", self.progress.step)
            return
        rngs = (self.dist.all_gather_objects(_to_bytes(rng_state()), "saving a checkpoint")
                if self.dist.distributed else [])
        failure = None
        if self.dist.is_primary:
            payload = self.state_payload()
            if self.dist.distributed:
                # payload["rng"] stays rank 0's, for a single-process resume
                payload["rng_ranks"] = [torch.load(io.BytesIO(b), weights_only=True) for b in rngs]
            # the valid BLEU of these weights, for seq2seq-average best=N; None: saved between validations
            payload["valid_bleu"] = self.progress.validations[-1][1] if self._validated_now() else None
            try:
                save_step_checkpoint(payload, self.ckpt_dir, self.progress.step,
                                     self.cfg.trainer.keep_checkpoints, ("last", "best") if best else ("last",),
                                     protect=self._best_steps())
            except OSError as err:  # the write went to a temp file: earlier checkpoints are intact
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    remedy = "free space there"
                elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    remedy = "make it writable"
                else:
                    remedy = "fix that"
                failure = (f"cannot write a checkpoint to {self.ckpt_dir} at step {self.progress.step} "
                           f"({err.strerror or err}); {remedy}, then resume with trainer.resume={self.run_dir}")
        failure = self.dist.broadcast_object(failure, "saving a checkpoint")
        if failure is not None:
            if not self.dist.is_primary:
                raise ReportedByPrimary(TrainingError.exit_code)
            raise TrainingError(failure)

    def _validated_now(self) -> bool:
        """Whether the current step has been validated (a resumed run knows it from its checkpoint)."""
        v = self.progress.validations
        return bool(v) and v[-1][0] == self.progress.step

    def _best_steps(self) -> set[int]:
        """The ``trainer.keep_best_checkpoints`` validated steps with the best valid BLEU (the
        earlier step first among equals, as ``best.pt`` takes the first)."""
        ranked = sorted(self.progress.validations, key=lambda v: (-v[1], v[0]))
        return {int(step) for step, _ in ranked[: self.cfg.trainer.keep_best_checkpoints]}

    def checkpoint_bytes(self) -> int:
        """About how large one checkpoint is: weights and Adam's two moments in float32."""
        return 3 * 4 * self.num_parameters + 2**20

    def restore(self) -> Path:
        """Continue from ``last.pt``, or from the newest readable step checkpoint when it is damaged.
        Every rank reads it (the run directory must be on a file system all nodes see)."""
        if self.dist.is_primary:
            remove_partial_writes(self.ckpt_dir)
        self.dist.barrier("resuming")
        path, payload = load_latest(self.ckpt_dir, map_location=self.device)
        try:
            self.model.load_state_dict(payload["model"])
        except RuntimeError:
            raise RunDirError(f"{path}: does not match the model config ({state_mismatch(self.model, payload['model'])}); "
                              "resume with the run's own model settings") from None
        try:
            load_optimizer_state(self.optimizer, payload["optimizer"])
            self.scheduler.load_state_dict(payload["scheduler"])
        except (KeyError, ValueError) as err:
            raise RunDirError(f"{path}: its optimizer or schedule state does not fit this config ({err}); "
                              "resume with the run's own config, or start a new run") from None
        self.progress = Progress(**{"world_size": 1, **payload["progress"]})
        self._restore_rng_and_position(payload)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.progress.step,
                 self.progress.epoch, self.progress.batch_in_epoch)
        return path

    def _restore_rng_and_position(self, payload: dict[str, Any]) -> None:
        """Each rank's RNG state, and the place in the epoch, for the number of ranks now running.
        The same number of ranks continues exactly; another number goes on from the same batch
        of the epoch (as near as its groups of batches allow) with fresh per-rank RNG streams."""
        p, world, rank = self.progress, self.dist.world_size, self.dist.rank
        saved = payload.get("rng_ranks") or [payload["rng"]]
        if len(saved) == world:
            set_rng_state(saved[rank])
        else:
            set_rng_state(payload["rng"])
            if rank:
                seed_everything(self.cfg.seed + 7919 * rank + p.step)
        if p.world_size != world:
            consumed = p.batch_in_epoch * p.world_size
            if self.dist.is_primary:
                log.warning("the checkpoint was written by %d rank(s), this run has %d: the epoch in progress "
                            "goes on from its batch %d of %d; an exact continuation needs the same number of "
                            "ranks", p.world_size, world, consumed, len(self.sampler))
            p.batch_in_epoch = consumed // world
            p.world_size = world

    # ------------------------------------------------------------------ steps

    def _batch(self, indices: list[int]) -> Batch:
        return collate([self.train_src[i] for i in indices], [self.train_tgt[i] for i in indices], indices).to(self.device)

    def _loss(self, batch: Batch, teacher_forcing: float) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            out = self.engine.forward(batch, teacher_forcing=teacher_forcing)
            loss = self.engine.loss(out, batch, self.cfg.trainer.label_smoothing)
            weight = self.cfg.trainer.coverage_loss
            if weight > 0 and out.attention is not None and self.progress.step >= self.cfg.trainer.coverage_loss_start:
                loss = loss + weight * coverage_penalty(out.attention, batch.tgt_mask)
            return loss

    def train_step(self, batch: Batch) -> StepResult:
        """One update, or a skipped one when the loss/gradient is not finite or the batch runs out of memory."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss = self._loss(batch, teacher_forcing_ratio(self.cfg, self.progress.step))
            loss.backward()
        except torch.OutOfMemoryError:
            out_of_memory = True
        else:
            out_of_memory = False
        if out_of_memory:  # outside the except block, so the traceback's activations are freed
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        tokens, stop = batch.num_tgt_tokens, self.stop_signal is not None
        loss_value = math.nan if out_of_memory else float(loss.detach())
        wall = time.perf_counter() - self._clock_origin
        if self.dist.distributed:  # the ranks' clocks differ a little; the time budget must end on one update
            loss_value, tokens, out_of_memory, stop, wall = self._average_gradients(loss_value, tokens,
                                                                                   out_of_memory, stop, wall)
        if out_of_memory:
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(skipped=SKIPPED_OOM, tokens=tokens, stop=stop, wall_seconds=wall)
        max_norm = self.cfg.optim.clip_norm
        grad_norm = gradient_norm_of(self.optimizer, self.params, max_norm)
        norm_value = float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss_value, norm_value, skipped=SKIPPED_NONFINITE, tokens=tokens, stop=stop,
                              wall_seconds=wall)
        update(self.optimizer, grad_norm, max_norm)
        self.scheduler.after_update(self.time_spent(wall))
        return StepResult(loss_value, norm_value, tokens=tokens, stop=stop, wall_seconds=wall)

    def time_spent(self, wall_seconds: float) -> float:
        """The share of trainer.max_minutes spent after ``wall_seconds`` of training; 0 without it."""
        minutes = self.cfg.trainer.max_minutes
        return 0.0 if minutes is None else wall_seconds / (60.0 * minutes)

    def _average_gradients(self, loss: float, tokens: int, out_of_memory: bool, stop: bool,
                           wall: float) -> tuple[float, int, bool, bool, float]:
        """One all-reduce over the ranks: each rank's gradient weighted by its target tokens, so
        the result is the gradient of the mean loss over every rank's tokens (what one process
        given all the batches would compute), plus what every rank must decide alike: the loss,
        the token count, whether any rank ran out of memory, whether a signal reached any rank,
        the training time (the ranks' mean, so the time budget and the schedule agree on all).
        A non-finite gradient anywhere makes the sum non-finite on every rank, so all skip."""
        sizes = [p.numel() for p in self.params]
        total = sum(sizes)
        if self._flat is None:
            self._flat = torch.empty(total + 5, dtype=torch.float32, device=self.device)
        flat, offset = self._flat, 0
        for p, n in zip(self.params, sizes):
            view = flat[offset:offset + n]
            if p.grad is None or out_of_memory:  # a rank that ran out of memory adds nothing
                view.zero_()
            else:
                view.copy_(p.grad.reshape(-1)).mul_(tokens)
            offset += n
        weighted_loss = 0.0 if out_of_memory else loss * tokens
        flat[total:] = torch.tensor([tokens, weighted_loss, float(out_of_memory), float(stop),
                                     wall / self.dist.world_size], dtype=torch.float32)
        self.dist.all_reduce_sum(flat, f"update {self.progress.step + 1}")
        head = flat[total:].tolist()
        all_tokens, any_oom, any_stop = int(round(head[0])), head[2] > 0, head[3] > 0
        if not any_oom:
            flat[:total].div_(all_tokens)
            offset = 0
            for p, n in zip(self.params, sizes):
                if p.grad is None:
                    p.grad = torch.empty_like(p)
                p.grad.copy_(flat[offset:offset + n].view_as(p))
                offset += n
        return head[1] / all_tokens, all_tokens, any_oom, any_stop, head[4]

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self, tracker: Tracker | NullTracker) -> dict[str, float]:
        """Valid loss, perplexity, greedy BLEU and chrF. With several ranks each takes a share of
        the batches and sentences; rank 0 scores them and every rank gets its metrics."""
        self.model.eval()
        rank, world = self.dist.rank, self.dist.world_size
        valid = self.data.valid.select_columns(["src", "ref", "src_ids", "tgt_ids"])[:]
        src_ids, tgt_ids = valid["src_ids"], valid["tgt_ids"]
        total_loss, total_tokens = 0.0, 0
        sampler = TokenBatchSampler([len(s) for s in src_ids], [len(t) for t in tgt_ids],
                                    self.cfg.trainer.max_tokens, self.cfg.trainer.max_sentences, 0, shuffle=False)
        for indices in sampler.batches(0)[rank::world]:
            batch = collate([src_ids[i] for i in indices], [tgt_ids[i] for i in indices], indices).to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                mean = self.engine.loss(self.engine.forward(batch), batch, 0.0)
            total_loss += float(mean) * batch.num_tgt_tokens
            total_tokens += batch.num_tgt_tokens
        if self.dist.distributed:
            sums = self.dist.all_reduce_sum(torch.tensor([total_loss, total_tokens], dtype=torch.float64),
                                            "validation")
            total_loss, total_tokens = float(sums[0]), int(sums[1])
        loss = total_loss / max(1, total_tokens)
        n = len(src_ids) if self.cfg.trainer.valid_max_sentences is None else min(
            len(src_ids), self.cfg.trainer.valid_max_sentences)
        greedy = type(self.cfg.search)(batch_size=self.cfg.search.batch_size,
                                       max_len_ratio=self.cfg.search.max_len_ratio,
                                       max_len_offset=self.cfg.search.max_len_offset)
        hyps = translate_ids(self.engine, src_ids[rank:n:world], greedy, self.device, self.amp_dtype)
        shares = self.dist.all_gather_objects([h.tokens for h in hyps], "validation")
        metrics = None
        if self.dist.is_primary:
            tokens: list[list[int]] = [[] for _ in range(n)]
            for r, share in enumerate(shares):
                tokens[r:n:world] = share
            hyp_text = self.data.tokenizer.decode_tgt(tokens)
            refs = valid["ref"][:n]
            score = corpus_score(hyp_text, refs)
            metrics = {"valid/loss": loss, "valid/ppl": math.exp(min(loss, 50.0)), "valid/bleu": score.bleu,
                       "valid/chrf": score.chrf}
            tracker.scalars(metrics, self.progress.step)
            samples = min(self.cfg.trainer.sample_translations, n)
            if samples:
                rows = [f"**source:** {valid['src'][i]}  \n**reference:** {refs[i]}  \n**hypothesis:** {hyp_text[i]}"
                        for i in range(samples)]
                tracker.text("valid/samples", "\n\n---\n\n".join(rows), self.progress.step)
        return self.dist.broadcast_object(metrics, "validation")

    # ------------------------------------------------------------------ loop

    def total_steps(self) -> int | None:
        """The updates the budget allows: trainer.max_steps, or max_epochs' worth (whichever ends
        first); None when only trainer.max_minutes bounds the run."""
        t = self.cfg.trainer
        by_epochs = None if t.max_epochs is None else t.max_epochs * self.batches_per_epoch
        bounds = [x for x in (t.max_steps, by_epochs) if x is not None]
        return min(bounds) if bounds else None

    def time_budget_spent(self) -> bool:
        minutes = self.cfg.trainer.max_minutes
        return minutes is not None and self.progress.wall_seconds >= 60.0 * minutes

    def budget_spent(self) -> bool:
        p, t = self.progress, self.cfg.trainer
        return (t.max_steps is not None and p.step >= t.max_steps) or (
            t.max_epochs is not None and p.epoch >= t.max_epochs) or self.time_budget_spent()

    def ended_by(self) -> str | None:
        """The config key that ended a finished run (early stopping, or the budget spent first); None
        while it can go on."""
        p, t = self.progress, self.cfg.trainer
        if self.early_stopped():
            return "trainer.patience"
        for key, spent in (("trainer.max_steps", t.max_steps is not None and p.step >= t.max_steps),
                           ("trainer.max_epochs", t.max_epochs is not None and p.epoch >= t.max_epochs),
                           ("trainer.max_minutes", self.time_budget_spent())):
            if spent:
                return key
        return None

    def early_stopped(self) -> bool:
        patience = self.cfg.trainer.patience
        return patience > 0 and self.progress.bad_validations >= patience

    def _after_validation(self, metrics: dict[str, float]) -> bool:
        """Bookkeeping after a validation; returns True when early stopping triggers."""
        p = self.progress
        bleu = metrics["valid/bleu"]
        p.validations.append([p.step, bleu])
        self.scheduler.after_validation(bleu)
        improved = bleu > p.best_bleu
        if improved:
            p.best_bleu, p.best_step, p.bad_validations = bleu, p.step, 0
        else:
            p.bad_validations += 1
        log.info("step %d: valid loss %.3f, ppl %.2f, BLEU %.2f, chrF %.2f%s", p.step, metrics["valid/loss"],
                 metrics["valid/ppl"], bleu, metrics["valid/chrf"], " (best)" if improved else "")
        patience = self.cfg.trainer.patience
        stop = patience > 0 and p.bad_validations >= patience
        self.save(best=improved)
        return stop

    def _request_stop(self, signum: int, _frame: Any) -> None:
        # Finish the current update, then save and leave: never stop half-way through a step.
        self.stop_signal = signum

    def fit(self) -> Progress:
        """Train until the budget, early stopping, or SIGINT/SIGTERM (which save ``last`` first)."""
        self.stop_signal = None
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                handlers[sig] = signal.signal(sig, self._request_stop)
            except ValueError:  # not the main thread: leave signals alone
                pass
        try:
            return self._fit()
        except PeerLost as err:
            raise PeerLost(f"{err}; the job stops at step {self.progress.step}; resume from the last checkpoint "
                           f"with trainer.resume={self.run_dir}") from None
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _skipped(self, result: StepResult, batch: Batch, tracker: Tracker | NullTracker) -> None:
        """Count a skipped update, log it, and stop the run when too many come in a row."""
        p, t = self.progress, self.cfg.trainer
        if result.skipped == SKIPPED_OOM:
            p.oom_steps += 1
            p.consecutive_oom += 1
            p.consecutive_skipped = 0
            tracker.scalars({"train/oom_skipped": p.oom_steps}, p.step)
            if self.dist.distributed:  # every rank skips; which rank ran out, and on what batch, is not known here
                log.warning("step %d: a rank ran out of memory; update skipped on every rank (%d so far); lower "
                            "trainer.max_tokens if this repeats", p.step, p.oom_steps)
            else:
                log.warning("step %d: out of memory on a batch of %d sentences (source %dx%d, target %dx%d, %d "
                            "target tokens); update skipped (%d so far); lower trainer.max_tokens if this repeats",
                            p.step, batch.src.shape[0], *batch.src.shape, *batch.tgt_in.shape, batch.num_tgt_tokens,
                            p.oom_steps)
            if p.consecutive_oom >= t.max_oom_steps:
                if not self.dist.is_primary:
                    raise ReportedByPrimary(TrainingError.exit_code)
                raise TrainingError(f"{p.consecutive_oom} consecutive batches ran out of memory; stopped at step "
                                    f"{p.step}; lower trainer.max_tokens (now {t.max_tokens}); the last good "
                                    f"checkpoint is in {self.ckpt_dir}")
            return
        p.skipped_steps += 1
        p.consecutive_skipped += 1
        p.consecutive_oom = 0
        tracker.scalars({"train/skipped_steps": p.skipped_steps}, p.step)
        if self.dist.is_primary:
            log.warning("step %d: non-finite loss or gradient; update skipped", p.step)
        if p.consecutive_skipped >= t.max_nonfinite_steps:
            if not self.dist.is_primary:
                raise ReportedByPrimary(TrainingError.exit_code)
            raise TrainingError(
                f"{p.consecutive_skipped} consecutive updates had a non-finite loss or gradient; "
                f"stopped at step {p.step} (lower optim.lr or check the data); the last good "
                f"checkpoint is in {self.ckpt_dir}")

    def _log_window(self, tracker: Tracker | NullTracker, bar: tqdm, elapsed: float) -> None:
        """Log the mean loss of the updates since the last log line, then start a new window."""
        p, cfg = self.progress, self.cfg
        loss = p.window_loss / p.window_tokens
        stats = {"train/loss": loss, "train/ppl": math.exp(min(loss, 50.0)),
                 "train/lr": self.optimizer.param_groups[0]["lr"],
                 "train/grad_norm": p.window_norm / p.window_steps,
                 "train/tokens_per_s": p.window_tokens / max(elapsed, 1e-9),
                 "train/teacher_forcing": teacher_forcing_ratio(cfg, p.step)}
        tracker.scalars(stats, p.step)
        log.info("step %d: train loss %.4f, ppl %.2f, lr %.3g, grad norm %.3f, %.0f target tokens/s", p.step,
                 loss, stats["train/ppl"], stats["train/lr"], stats["train/grad_norm"], stats["train/tokens_per_s"])
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{stats['train/tokens_per_s']:.0f}")
        p.window_loss, p.window_norm, p.window_tokens, p.window_steps = 0.0, 0.0, 0, 0

    def _fit(self) -> Progress:
        cfg, p = self.cfg, self.progress
        # On resume, TensorBoard drops what a killed process logged after the checkpoint, so the
        # curves show each step once.
        primary = self.dist.is_primary
        tracker = (Tracker(self.run_dir, purge_step=p.step + 1 if p.step else None) if primary
                   else NullTracker())
        total = self.total_steps()
        # disable=None: no bar when stderr is not a terminal (nohup, CI), where it would flood the log
        bar = tqdm(total=total, initial=p.step, disable=None if cfg.trainer.progress and primary else True,
                   unit="step", dynamic_ncols=True)
        save_every = cfg.trainer.save_every
        window_start = time.perf_counter()
        self._clock_origin = window_start - p.wall_seconds  # a resumed run's time budget goes on

        def validate_now(window_start: float) -> tuple[bool, float]:
            """Validate; whether to stop early, and the log window's start moved by the
            validation's time (the window's tokens/s counts training time only)."""
            start = time.perf_counter()
            stop = self._after_validation(self.validate(tracker))
            return stop, window_start + time.perf_counter() - start

        stop = False
        try:
            with logging_redirect_tqdm():
                while not self.budget_spent() and not stop:
                    for indices in self.sampler.iterate(p.epoch, p.batch_in_epoch, self.dist.world_size,
                                                        self.dist.rank):
                        batch = self._batch(indices)
                        step_start = time.perf_counter()
                        result = self.train_step(batch)
                        p.batch_in_epoch += 1
                        p.step += 1
                        tokens = result.tokens
                        p.train_seconds += time.perf_counter() - step_start
                        p.wall_seconds = result.wall_seconds
                        p.train_tokens += tokens
                        bar.update(1)
                        if result.skipped:
                            self._skipped(result, batch, tracker)
                        else:
                            p.consecutive_skipped = p.consecutive_oom = 0
                            p.window_loss += result.loss * tokens
                            p.window_norm += result.grad_norm
                            p.window_tokens += tokens
                            p.window_steps += 1
                        if p.step % cfg.trainer.log_every == 0 and p.window_steps:
                            self._log_window(tracker, bar, time.perf_counter() - window_start)
                            window_start = time.perf_counter()
                        if p.step % cfg.trainer.valid_every == 0:
                            stop, window_start = validate_now(window_start)
                        elif save_every is not None and p.step % save_every == 0:
                            self.save()
                        if result.stop or (not self.dist.distributed and self.stop_signal is not None):
                            self.save()
                            if primary:
                                launcher = "torchrun ... " if self.dist.distributed else ""
                                log.warning("stopped by signal %s at step %d; continue with: %sseq2seq-train "
                                            "trainer.resume=%s", self.stop_signal or "(to another rank)", p.step,
                                            launcher, self.run_dir)
                            return p
                        if stop or self.budget_spent():
                            break
                    else:  # epoch finished
                        p.epoch += 1
                        p.batch_in_epoch = 0
                        # After the epoch's bookkeeping, so the checkpoint this validation saves
                        # resumes at the start of the next epoch.
                        if cfg.trainer.valid_each_epoch and not self._validated_now():
                            stop, window_start = validate_now(window_start)
                if not self._validated_now() and not stop:  # the final state is always validated
                    self._after_validation(self.validate(tracker))
            if stop:
                log.info("early stopping: no better valid BLEU in %d validations", cfg.trainer.patience)
            elif self.time_budget_spent() and primary:
                log.info("time budget spent: trainer.max_minutes=%g reached at step %d (epoch %d, batch %d)",
                         cfg.trainer.max_minutes, p.step, p.epoch, p.batch_in_epoch)
            p.finished = True
            self.save()
        finally:
            bar.close()
            tracker.close()
        log.info("training done: %d steps, best valid BLEU %.2f at step %d, %.0f target tokens/s",
                 p.step, p.best_bleu, p.best_step, p.train_tokens / max(p.train_seconds, 1e-9))
        return p
