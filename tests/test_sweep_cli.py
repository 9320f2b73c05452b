"""A real (tiny) Hydra multirun on the synthetic corpus, compared with seq2seq-compare."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import signal_once_training
from test_train_cli import ok, run_cli, script

from seq2seq.evaluation.compare_runs import find_run_dirs


def test_multirun_sweep_ends_in_a_comparison(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ok(run_cli("seq2seq-train", ["-m", "experiment=smoke", "model/attention=none,bahdanau", "trainer.max_steps=12",
                                 "trainer.valid_every=6", "eval.heatmaps=0", "eval.bootstrap_samples=200"],
               tmp_path, cache, timeout=600))
    sweeps = list((tmp_path / "outputs" / "smoke" / "multirun").iterdir())
    assert len(sweeps) == 1
    sweep = sweeps[0]
    runs = find_run_dirs([sweep])
    assert len(runs) == 2
    for run in runs:  # both runs log under the sweep, so one tensorboard --logdir overlays them
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
        summary = json.loads((run / "summary.json").read_text())
        assert summary["finished"] is True
        assert summary["peak_memory_scope"] == "job"  # the second job's peak is its own, not the process's
        speed = json.loads((run / "eval" / "test" / "report.json").read_text())["speed"]
        assert speed["sentences_per_s"] > 0 and speed["device"] == "cpu"

    proc = ok(run_cli("seq2seq-compare", [str(sweep), "--bootstrap", "200"], tmp_path, cache))
    assert "none" in proc.stdout.decode() and "bahdanau" in proc.stdout.decode()
    for name in ("comparison.md", "comparison.csv", "comparison.json", "bleu_by_length.png",
                 "bleu_by_length_relative.png"):
        assert (sweep / name).is_file(), name
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    assert {r["label"] for r in rows} == {"none", "bahdanau"}
    result = json.loads((sweep / "comparison.json").read_text())
    assert result["baseline"] == "none"


def test_a_sweep_with_failed_jobs_exits_non_zero_naming_them(tmp_path: Path) -> None:
    """Every job of this sweep fails at run time (no corpus where it points); the sweep still runs
    each, then exits 1 with one line naming the failed jobs."""
    proc = run_cli("seq2seq-train", ["-m", "data=multi30k", f"data.root={tmp_path}/nowhere-a,{tmp_path}/nowhere-b",
                                     "trainer.max_steps=1"], tmp_path, tmp_path / "cache", timeout=300)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("error: 2 sweep job(s) failed: "), last
    assert "nowhere-a" in last and "nowhere-b" in last


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_stops_the_whole_sweep(tmp_path: Path, sig) -> None:
    """The signal stops the sweep, not only the job training then: that job is saved and says how
    to resume, no later job starts, and the exit status is 0 as for a single run."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "SEQ2SEQ_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.Popen([script("seq2seq-train"), "-m", "experiment=smoke", "model/attention=none,bahdanau",
                             "trainer.max_steps=100000", "trainer.valid_every=100000", "trainer.log_every=1",
                             f"hydra.sweep.dir={sweep}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = signal_once_training(proc, sweep / "0" / "train.log", sig)  # the first job
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert f"continue with: seq2seq-train trainer.resume={sweep / '0'}" in out + err
    assert "sweep stopped with the job in" in out + err
    assert (sweep / "0" / "checkpoints" / "last.pt").exists()
    assert not (sweep / "1").exists()  # the second job never started
