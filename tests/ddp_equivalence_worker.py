"""One rank of the data-parallel equivalence check (tests/test_distributed.py), started by torchrun.

Each rank takes its half of each of the first K training batches of the smoke corpus and makes
K updates through ``Trainer.train_step``, for each engine in turn; it writes its final weights to
``<out>/<engine>-rank<R>.pt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from conftest import smoke_config

from seq2seq.data.prepare import prepare_data
from seq2seq.training.distributed import init_process_group, launch_env
from seq2seq.training.trainer import Trainer

EQUIVALENCE_OVERRIDES = ("trainer.precision=fp32", "model.dropout=0.0", "trainer.label_smoothing=0.1")


def halves(indices: list[int], world: int, rank: int) -> list[int]:
    """Rank ``rank``'s share of one batch: a contiguous slice, sizes differing by at most one."""
    size = -(-len(indices) // world)
    return indices[rank * size:(rank + 1) * size]


def main(cache: Path, out: Path, updates: int) -> None:
    env = launch_env()
    assert env is not None and env.world_size == 2
    dist = init_process_group(env, torch.device("cpu"))
    for kernels in ("fast", "reference"):
        cfg = smoke_config(cache, *EQUIVALENCE_OVERRIDES, f"trainer.kernels={kernels}", "trainer.num_threads=1")
        data = prepare_data(cfg.data, cfg.tokenizer)
        trainer = Trainer(cfg, data, out / f"run-{kernels}", dist)
        for indices in trainer.sampler.batches(0)[:updates]:
            result = trainer.train_step(trainer._batch(halves(indices, env.world_size, env.rank)))
            assert not result.skipped
            trainer.progress.step += 1
        torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()},
                   out / f"{kernels}-rank{env.rank}.pt")
    decisions(cache, out, env.rank, dist)
    dist.close()


def decisions(cache: Path, out: Path, rank: int, dist) -> None:
    """Trouble on one rank only: rank 1 runs out of memory (update 1), rank 0 gets a non-finite
    loss (update 2), a signal reaches rank 1 (update 3), and the ranks' clocks disagree. Every rank
    must take the same decision and see the same training time;
    writes ``decisions-rank<R>.json`` and the final weights."""
    cfg = smoke_config(cache, *EQUIVALENCE_OVERRIDES, "trainer.kernels=reference", "trainer.num_threads=1")
    trainer = Trainer(cfg, prepare_data(cfg.data, cfg.tokenizer), out / "run-decisions", dist)
    forward, loss = trainer.engine.forward, trainer.engine.loss

    def failing_forward(*args, **kwargs):
        if rank == 1 and trainer.progress.step == 1:
            raise torch.OutOfMemoryError("simulated")
        return forward(*args, **kwargs)

    def failing_loss(*args, **kwargs):
        value = loss(*args, **kwargs)
        return value * float("nan") if rank == 0 and trainer.progress.step == 2 else value

    trainer.engine.forward, trainer.engine.loss = failing_forward, failing_loss
    trainer._clock_origin -= 30.0 * rank  # rank 1's clock 30 s ahead: the time budget must still agree
    seen = []
    for indices in trainer.sampler.batches(0)[:5]:
        trainer.stop_signal = 15 if rank == 1 and trainer.progress.step == 3 else None
        result = trainer.train_step(trainer._batch(halves(indices, dist.world_size, rank)))
        seen.append({"skipped": result.skipped, "stop": result.stop, "tokens": result.tokens,
                     "loss": None if result.skipped else round(result.loss, 6),
                     "wall": round(result.wall_seconds, 3)})
        trainer.progress.step += 1
    (out / f"decisions-rank{rank}.json").write_text(json.dumps(seen))
    torch.save(trainer.model.state_dict(), out / f"decisions-rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
