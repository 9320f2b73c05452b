"""``torchrun --standalone --nproc_per_node=2 seq2seq-train ...`` as a user runs it (CPU, gloo,
one thread per rank): one run directory that the single-process commands read, exact resume,
a bad config said once, a killed rank ending the job in bounded time, Ctrl-C saving once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_cli import ok, run_cli, script

from seq2seq.core.checkpoint import load_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            script("seq2seq-train")]
LOSS = re.compile(r"step (\d+): train loss ([0-9.]+)")
RUN = ["experiment=smoke", "trainer.num_threads=1", "model.dropout=0.3", "trainer.log_every=1",
       "trainer.valid_every=10"]


def env_for(cache: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "SEQ2SEQ_CACHE": str(cache),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    for key in ("SEQ2SEQ_DEBUG", "HYDRA_FULL_ERROR", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def torchrun(args: list[str], cwd: Path, cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, *args], cwd=cwd, env=env_for(cache), capture_output=True, text=True,
                          timeout=timeout)


def losses(run: Path) -> dict[int, str]:
    found = LOSS.findall((run / "train.log").read_text(encoding="utf-8"))
    steps = [int(s) for s, _ in found]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {int(s): loss for s, loss in found}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, cache) -> Path:
    """30 updates of 2 ranks with the default run directory (``outputs/<name>/${now:...}``)."""
    cwd = tmp_path_factory.mktemp("ddp")
    proc = torchrun([*RUN, "name=ddp", "trainer.max_steps=30"], cwd, cache)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((cwd / "outputs" / "ddp").iterdir())
    assert len(runs) == 1, f"the ranks made {len(runs)} run directories: {runs}"
    return runs[0]


def test_two_ranks_train_into_one_run_directory(ddp_run):
    assert sorted(losses(ddp_run)) == list(range(1, 31))  # each step logged once, by rank 0
    log = (ddp_run / "train.log").read_text(encoding="utf-8")
    assert "data parallel over 2 ranks" in log and "up to 4096 tokens (padding included) per update" in log
    assert (ddp_run / ".hydra" / "overrides.yaml").is_file()
    summary = json.loads((ddp_run / "summary.json").read_text())
    assert summary["ranks"] == 2 and len(summary["peak_rss_mb"]) == 2 and summary["finished"]
    assert summary["steps"] == 30
    payload = load_checkpoint(ddp_run / "checkpoints" / "last.pt")
    assert len(payload["rng_ranks"]) == 2 and payload["progress"]["world_size"] == 2
    assert (ddp_run / "eval" / "test" / "report.json").is_file()  # rank 0 evaluated


def test_single_process_commands_read_a_ddp_run(ddp_run, cache, tmp_path):
    ok(run_cli("seq2seq-evaluate", [f"run_dir={ddp_run}", "split=valid"], tmp_path, cache))
    out = ok(run_cli("seq2seq-translate", [f"run_dir={ddp_run}"], tmp_path, cache, stdin=b"a b c\n"))
    assert len(out.stdout.splitlines()) == 1
    proc = ok(run_cli("seq2seq-train", [f"trainer.resume={ddp_run}", "trainer.max_steps=33",
                                        "trainer.evaluate_at_end=false"], tmp_path, cache))
    assert "written by 2 rank(s), this run has 1" in (proc.stdout + proc.stderr).decode()
    assert load_checkpoint(ddp_run / "checkpoints" / "last.pt")["progress"]["step"] == 33


def test_resume_under_torchrun_continues_exactly(ddp_run, cache, tmp_path):
    """Stopped at 10 and resumed to 30, 2 ranks log the losses of the uninterrupted 2-rank run
    (dropout on: each rank's RNG stream is restored)."""
    split = tmp_path / "split"
    ok(torchrun([*RUN, "trainer.max_steps=10", f"hydra.run.dir={split}"], tmp_path, cache))
    ok(torchrun([f"trainer.resume={split}", "trainer.max_steps=30"], tmp_path, cache))
    expected = {s: v for s, v in losses(ddp_run).items() if s <= 30}
    assert losses(split) == expected


def test_a_single_process_run_resumes_under_torchrun(cache, tmp_path):
    run = tmp_path / "single"
    ok(run_cli("seq2seq-train", [*RUN, "trainer.max_steps=10", f"hydra.run.dir={run}",
                                 "trainer.evaluate_at_end=false"], tmp_path, cache))
    proc = ok(torchrun([f"trainer.resume={run}", "trainer.max_steps=14"], tmp_path, cache))
    assert "written by 1 rank(s), this run has 2" in proc.stdout + proc.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["progress"]["step"] == 14


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_bad_config_fails_once_and_leaves_nothing(cache, tmp_path):
    proc = torchrun([*RUN, "trainer.max_tokens=0", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, cache)
    assert proc.returncode != 0
    assert error_lines(proc.stderr) == ["error: trainer.max_tokens must be a positive integer (got 0)"]
    assert not (tmp_path / "run").exists()


def test_a_sweep_under_torchrun_is_refused_once(cache, tmp_path):
    proc = torchrun([*RUN, "-m", "seed=1,2"], tmp_path, cache)
    assert proc.returncode != 0
    [line] = error_lines(proc.stderr)
    assert "cannot run under torchrun" in line


def start(args: list[str], cwd: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([*TORCHRUN, *args], cwd=cwd, env=env_for(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "train.log").is_file() and any(s >= step for s in losses(run)):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {timeout} s")


def workers(proc: subprocess.Popen) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def test_a_killed_rank_ends_the_job_with_one_line_in_bounded_time(cache, tmp_path):
    run = tmp_path / "run"
    proc = start([*RUN, "trainer.max_steps=100000", "trainer.valid_every=100000", f"hydra.run.dir={run}"],
                 tmp_path, cache)
    try:
        wait_for_step(run, 5, proc)
        ranks = workers(proc)
        assert len(ranks) == 2, ranks
        os.kill(ranks[-1], signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - killed < 60
    assert proc.returncode != 0
    [line] = error_lines(stderr)
    assert "lost contact with the other ranks" in line and f"trainer.resume={run}" in line


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_to_torchrun_saves_once_and_every_rank_exits_0(cache, tmp_path, sig):
    run = tmp_path / "run"
    proc = start([*RUN, "trainer.max_steps=100000", "trainer.valid_every=100000", f"hydra.run.dir={run}"],
                 tmp_path, cache)
    try:
        wait_for_step(run, 5, proc)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (run / "train.log").read_text(encoding="utf-8")
    assert log.count("stopped by signal") == 1, log[-2000:]
    assert "ChildFailedError" not in stderr and "exitcode" not in stderr, stderr[-3000:]  # no rank failed
    assert not error_lines(stderr)
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    assert not payload["progress"]["finished"] and payload["progress"]["step"] >= 5
    assert len(list((run / "checkpoints").glob("step-*.pt"))) == 1  # saved once


# ----------------------------------------------------------------------------- cluster sweeps


@pytest.mark.parametrize("launcher", ["slurm_ddp", "local_ddp"])
def test_the_launcher_configs_compose_and_the_plugin_loads(launcher):
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class

    from seq2seq.cli import CONFIG_DIR
    from seq2seq.core.config import register_configs

    register_configs()
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}", "hydra.launcher.nodes=2"],
                      return_hydra_config=True)
    got = cfg.hydra.launcher
    assert got.nodes == 2 and got.tasks_per_node >= 2 and "timeout_min" in got
    if launcher == "slurm_ddp":
        assert got.gpus_per_node == got.tasks_per_node and "partition" in got  # one task per GPU
    assert get_class(got._target_).__name__.endswith("Launcher")  # hydra-submitit-launcher is installed


def test_a_sweep_job_runs_data_parallel_across_its_tasks(cache, tmp_path):
    """submitit's local executor starts each job as 2 tasks, as SLURM would with tasks_per_node=2:
    they join as 2 ranks of one run that writes one job directory."""
    sweep = tmp_path / "sweep"
    env = env_for(cache)
    proc = subprocess.run([script("seq2seq-train"), "-m", "hydra/launcher=local_ddp", *RUN, "trainer.max_steps=12",
                           "seed=5", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    job = sweep / "0"
    summary = json.loads((job / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["steps"] == 12
    assert sorted(losses(job)) == list(range(1, 13))  # rank 0 alone wrote the log
