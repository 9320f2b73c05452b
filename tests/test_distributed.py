"""Data-parallel training: the launch environment, dealing batches to ranks, and the equivalence
of 2 ranks each given half of every batch with 1 process given the whole batch (torchrun, gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import smoke_config
from ddp_equivalence_worker import EQUIVALENCE_OVERRIDES

from seq2seq.core.errors import TrainingError
from seq2seq.data.batching import TokenBatchSampler
from seq2seq.training.distributed import (
    Dist,
    backend_for,
    launch_env,
    rank_device,
    submitit_to_torch_env,
    threads_per_rank,
)
from seq2seq.training.trainer import Trainer

TESTS = Path(__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
FULL = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "localhost",
        "MASTER_PORT": "29500"}


# ----------------------------------------------------------------------------- launch environment


def test_no_launcher_or_a_world_of_one_is_a_single_process():
    assert launch_env({}) is None
    assert launch_env({**FULL, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None


def test_torchrun_variables_give_the_rank():
    env = launch_env(FULL)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 2, 1, 2)


@pytest.mark.parametrize("broken", [{"RANK": ""}, {"MASTER_PORT": ""}, {"RANK": "x"}, {"RANK": "2"},
                                    {"LOCAL_RANK": "5"}])
def test_a_broken_launch_environment_is_one_line(broken):
    with pytest.raises(TrainingError) as err:
        launch_env({**FULL, **broken})
    assert "\n" not in str(err.value) and "torchrun" in str(err.value)


def test_submitit_tasks_become_ranks():
    env = submitit_to_torch_env({}, global_rank=3, local_rank=1, num_tasks=4, num_nodes=2,
                                hostnames=["gpu-a", "gpu-b"], job_id="1234_7")
    assert env["RANK"] == "3" and env["WORLD_SIZE"] == "4" and env["LOCAL_RANK"] == "1"
    assert env["LOCAL_WORLD_SIZE"] == "2" and env["MASTER_ADDR"] == "gpu-a"
    assert 20000 <= int(env["MASTER_PORT"]) < 40000
    other = submitit_to_torch_env({}, 0, 0, 4, 2, ["gpu-a"], "1234_8")
    assert other["MASTER_PORT"] != env["MASTER_PORT"]  # two array jobs on one node do not meet
    assert launch_env(env) is not None
    assert submitit_to_torch_env({}, 0, 0, 1, 1, ["a"], "1") == {}  # one task: a plain run
    assert submitit_to_torch_env({"WORLD_SIZE": "2"}, 0, 0, 2, 1, ["a"], "1") == {}  # torchrun's win


def test_gpus_get_nccl_and_the_gpu_of_their_local_rank():
    # The CUDA branch, run here on its own values (no GPU needed to build a device object).
    assert backend_for(torch.device("cuda")) == "nccl" and backend_for(torch.device("cpu")) == "gloo"
    assert rank_device(torch.device("cuda"), 3) == torch.device("cuda", 3)
    assert rank_device(torch.device("cpu"), 3) == torch.device("cpu")


def test_threads_apply_per_rank_and_zero_shares_the_cores():
    assert threads_per_rank(3, local_world_size=4, cores=16) == 3
    assert threads_per_rank(0, local_world_size=4, cores=16) == 4
    assert threads_per_rank(0, local_world_size=4, cores=2) == 1


def test_a_single_process_talks_to_no_one():
    dist = Dist.single()
    t = torch.ones(3)
    assert dist.all_reduce_sum(t) is t and t.tolist() == [1, 1, 1]
    assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.all_gather_objects(5) == [5]
    assert dist.on_primary("x", lambda: 7) == 7 and dist.primary_first("x", lambda: 8) == 8
    assert dist.is_primary and not dist.distributed


# ----------------------------------------------------------------------------- dealing batches


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_rank_gets_the_same_number_of_batches_and_none_twice(world):
    sampler = TokenBatchSampler(list(range(1, 60)) * 3, list(range(2, 61)) * 3, 120, 64, seed=5)
    for epoch in range(3):
        batches = sampler.batches(epoch)
        per_rank = len(batches) // world
        shares = [list(sampler.iterate(epoch, 0, world, r)) for r in range(world)]
        assert all(len(s) == per_rank for s in shares)
        # update i takes the next `world` batches of the epoch's order, one per rank
        assert [b for i in range(per_rank) for b in (s[i] for s in shares)] == batches[:per_rank * world]
        # a resumed rank continues with its own next batch
        assert list(sampler.iterate(epoch, 2, world, world - 1)) == shares[world - 1][2:]
    assert list(sampler.iterate(0)) == sampler.batches(0)  # one process: as before


# ----------------------------------------------------------------------------- equivalence


def torchrun_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SEQ2SEQ_DEBUG", None)
    return env


def test_two_ranks_with_half_batches_equal_one_process_with_whole_batches(prepared, tmp_path):
    """After K updates the weights of 2 ranks that each took half of every batch equal those of
    one process given the whole batches (float32), on both engines, and both ranks hold the same
    weights. The halves differ in size and in tokens, which the token-weighted average must undo."""
    cache, data = prepared
    updates = 4
    proc = subprocess.run([*TORCHRUN, str(TESTS / "ddp_equivalence_worker.py"), str(cache), str(tmp_path),
                           str(updates)], cwd=TESTS, env=torchrun_env(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
    for kernels in ("fast", "reference"):
        cfg = smoke_config(cache, *EQUIVALENCE_OVERRIDES, f"trainer.kernels={kernels}")
        single = Trainer(cfg, data, tmp_path / f"single-{kernels}")
        for indices in single.sampler.batches(0)[:updates]:
            assert not single.train_step(single._batch(indices)).skipped
            single.progress.step += 1
        expected = single.model.state_dict()
        ranks = [torch.load(tmp_path / f"{kernels}-rank{r}.pt") for r in range(2)]
        for name, value in expected.items():
            assert torch.equal(ranks[0][name], ranks[1][name]), f"{kernels}: ranks differ in {name}"
            torch.testing.assert_close(ranks[0][name], value, rtol=2e-5, atol=2e-6,
                                       msg=lambda m, n=name, k=kernels: f"{k}: {n}: {m}")
        initial = Trainer(cfg, data, tmp_path / "init").model.state_dict()
        moved = max(float((value - initial[name]).abs().max()) for name, value in expected.items())
        assert moved > 1e-3  # the updates did change the weights: the comparison is not vacuous


def test_trouble_on_one_rank_is_decided_alike_on_every_rank(prepared, tmp_path):
    """An out-of-memory batch on rank 1, a non-finite loss on rank 0, a signal to rank 1, clocks
    that disagree: every rank skips the same updates, stops at the same one and sees the same
    training time (what trainer.max_minutes reads), and the weights stay identical."""
    import json

    cache, _ = prepared
    proc = subprocess.run([*TORCHRUN, str(TESTS / "ddp_equivalence_worker.py"), str(cache), str(tmp_path), "1"],
                          cwd=TESTS, env=torchrun_env(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
    seen = [json.loads((tmp_path / f"decisions-rank{r}.json").read_text()) for r in range(2)]
    assert seen[0] == seen[1]
    assert [s["skipped"] for s in seen[0]] == [None, "out of memory", "non-finite", None, None]
    assert [s["stop"] for s in seen[0]] == [False, False, False, True, False]
    assert all(s["tokens"] > 0 for s in seen[0])
    assert all(s["wall"] >= 15.0 for s in seen[0])  # the mean of the two clocks, one of them 30 s ahead
    weights = [torch.load(tmp_path / f"decisions-rank{r}.pt") for r in range(2)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert all(torch.isfinite(v).all() for v in weights[0].values())
