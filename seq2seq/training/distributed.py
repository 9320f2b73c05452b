"""Data-parallel training across processes: the process group as the trainer uses it.

``torchrun`` (one node or several) starts one process per rank and tells each its place through
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``); a task of a multi-task job under Hydra's submitit launcher gets the same
variables from ``submitit_to_torch_env``. Without them (or with a world of one) training is one process and
``Dist.single()`` makes every collective the identity, so the single-process path runs exactly
as before.

Why the gradients are averaged here and not by ``torch.nn.parallel.DistributedDataParallel``:

- The update must equal one process's update on all ranks' tokens together. Each rank's loss is a
  mean over its own target tokens, and ranks hold different numbers of tokens; DDP averages the
  gradients over ranks, which weighs a short batch's tokens more. Here each rank's gradient is
  weighted by its token count and the sum divided by the total, in one collective.
- The same collective carries the decisions every rank must take together: skip the update
  (a non-finite loss or gradient anywhere makes the sum non-finite; an out-of-memory batch sets a
  flag) and stop (a signal reached any rank). Under DDP a rank that runs out of memory in the
  backward pass leaves the others waiting in its all-reduce until the timeout.
- It serves both engines the same way: the fast engine's hand-written backward passes do not
  go through a module's ``forward`` and so would not trigger DDP's hooks.

What it gives up is overlapping the all-reduce with the backward pass. An LSTM's weight
gradients are ready only when backpropagation through time reaches the first step, so there is
little to overlap.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from seq2seq.core.errors import Seq2SeqError, TrainingError

log = logging.getLogger(__name__)

T = TypeVar("T")

# torchrun's variables, all of which a rank needs
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# How long a collective waits for a rank that neither answers nor dies (a dead one is noticed at
# once: its sockets close). Validation runs on every rank, so no rank waits out another's.
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits among the ranks, from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The launch environment when this process is one of several ranks, else None (no launcher,
    or ``WORLD_SIZE=1``: nothing changes)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    missing = [k for k in LAUNCH_VARIABLES if not env.get(k)]
    try:
        world = int(env["WORLD_SIZE"])
        if world <= 1:
            return None
        if missing:
            raise ValueError
        rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
        local_world = int(env.get("LOCAL_WORLD_SIZE") or world)
    except ValueError:
        raise TrainingError(f"WORLD_SIZE={env.get('WORLD_SIZE')} is set but the launch environment is incomplete "
                            f"or not numbers ({', '.join(f'{k}={env.get(k)!r}' for k in LAUNCH_VARIABLES)}); "
                            "start the ranks with torchrun, or unset WORLD_SIZE for one process") from None
    if not (0 <= rank < world and 0 <= local_rank < local_world):
        raise TrainingError(f"RANK={rank} / LOCAL_RANK={local_rank} do not fit WORLD_SIZE={world} / "
                            f"LOCAL_WORLD_SIZE={local_world}; start the ranks with torchrun")
    return LaunchEnv(rank, world, local_rank, local_world)


def submitit_to_torch_env(environ: Mapping[str, str], global_rank: int, local_rank: int, num_tasks: int,
                          num_nodes: int, hostnames: Sequence[str], job_id: str) -> dict[str, str]:
    """torchrun's variables for one task of a multi-task job of Hydra's submitit launcher (SLURM,
    or its local executor), which runs the training function once per task; empty when the job
    has one task or torchrun's variables are already set. Rank 0 runs on the first node."""
    if num_tasks <= 1 or "WORLD_SIZE" in environ:
        return {}
    return {"RANK": str(global_rank), "WORLD_SIZE": str(num_tasks), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(max(1, num_tasks // max(1, num_nodes))),
            "MASTER_ADDR": hostnames[0] if hostnames else "localhost",
            # a port per job, so that two jobs sharing a node do not meet
            "MASTER_PORT": str(20000 + zlib.crc32(job_id.encode()) % 20000)}


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """Each rank on a node takes the GPU of its local rank; CPU ranks share the CPU."""
    return torch.device(device.type, local_rank) if device.type == "cuda" else device


def threads_per_rank(num_threads: int, local_world_size: int, cores: int | None = None) -> int:
    """``trainer.num_threads`` applies per rank; 0 shares the node's cores among its ranks."""
    if num_threads > 0:
        return num_threads
    return max(1, (cores or os.cpu_count() or 1) // local_world_size)


def backend_message(err: BaseException) -> str:
    """The gist of a gloo/NCCL error: its first sentence, without the source location
    (``[.../pair.cc:537] Read error [127.0.0.1]:17304: Connection reset by peer. This is ...``)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", text)
    return re.split(r"(?<=[a-z])\. ", text, maxsplit=1)[0][:200]


class PeerLost(TrainingError):
    """A collective failed because another rank died, was killed or stopped answering."""


class ReportedByPrimary(Seq2SeqError):
    """Rank 0 failed and said why; the other ranks end with its exit status and say nothing."""

    def __init__(self, exit_code: int) -> None:
        super().__init__("rank 0 reported the error")
        self.exit_code = exit_code


class Dist:
    """The ranks of one training run. ``Dist.single()`` is a run of one process: each method then
    returns its input and talks to no one."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, local_world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_world_size = local_rank, local_world_size

    @classmethod
    def single(cls) -> Dist:
        return cls()

    @property
    def is_primary(self) -> bool:
        """Rank 0: the only rank that writes the run directory, logs and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RuntimeError as err:  # gloo/NCCL errors (DistBackendError included) are RuntimeErrors
            raise PeerLost(f"rank {self.rank} lost contact with the other ranks during {what} "
                           f"({backend_message(err)}); another rank died or was stopped: see the launcher's "
                           "report") from None

    def all_reduce_sum(self, tensor: torch.Tensor, what: str = "an update") -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place."""
        if self.distributed:
            self._call(what, lambda: torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM))
        return tensor

    def broadcast_object(self, obj: T, what: str = "a decision") -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        self._call(what, lambda: torch_dist.broadcast_object_list(box, src=0))
        return box[0]

    def all_gather_objects(self, obj: T, what: str = "validation") -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._call(what, lambda: torch_dist.all_gather_object(out, obj))
        return out

    def broadcast_parameters(self, params: Sequence[torch.Tensor]) -> None:
        """Rank 0's weights everywhere: every rank starts from the same model."""
        if not self.distributed:
            return
        with torch.no_grad():
            for p in params:
                self._call("start-up", lambda p=p: torch_dist.broadcast(p.data, src=0))

    def barrier(self, what: str) -> None:
        if self.distributed:
            self._call(what, torch_dist.barrier)

    def on_primary(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 alone and give its result to every rank. When it fails, rank 0
        reports the error and the others end with the same status (``ReportedByPrimary``)."""
        if not self.distributed:
            return fn()
        result, failure = None, None
        if self.is_primary:
            try:
                result = fn()
            except Seq2SeqError as err:
                failure = err
        code, result = self.broadcast_object((failure.exit_code if failure else 0, result), what)
        if failure is not None:
            raise failure
        if code:
            raise ReportedByPrimary(code)
        return result  # type: ignore[return-value]

    def primary_first(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0, then, once it succeeded, on the others (data preparation: rank 0
        fills the cache the others then read). When it fails on rank 0, rank 0 reports the
        error and the others end with the same status (``ReportedByPrimary``)."""
        if not self.distributed:
            return fn()
        held: list[T] = []  # rank 0's result stays on rank 0: only the outcome is shared
        self.on_primary(what, lambda: held.append(fn()))
        return held[0] if self.is_primary else fn()

    def close(self) -> None:
        if self.distributed and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def init_process_group(env: LaunchEnv, device: torch.device) -> Dist:
    """Join the other ranks (``env://``: torchrun's MASTER_ADDR/MASTER_PORT)."""
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        torch_dist.init_process_group(backend=backend, timeout=TIMEOUT, rank=env.rank, world_size=env.world_size,
                                      device_id=device if device.type == "cuda" else None)
    except (RuntimeError, ValueError) as err:
        raise TrainingError(f"rank {env.rank}: cannot join the other ranks ({backend}: {backend_message(err)}); check "
                            "torchrun's --rdzv-endpoint / MASTER_ADDR and that every node can reach it") from None
    log.info("rank %d of %d (local rank %d), backend %s, device %s", env.rank, env.world_size, env.local_rank,
             backend, device)
    return Dist(env.rank, env.world_size, env.local_rank, env.local_world_size)
