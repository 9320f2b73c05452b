"""A job's peak memory: a -m sweep's later job does not report an earlier job's peak, a kernel
that cannot reset the peak gives the process's figure labelled as such, and the CUDA branch asks
torch for the job's device peak (run here on the CPU with torch.cuda stood in for)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seq2seq.core.memory import JobMemory, PeakMemory

CPU = torch.device("cpu")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs is Linux's")
def test_a_later_job_does_not_inherit_an_earlier_jobs_peak() -> None:
    big = np.ones(400 * 2**20 // 8)  # 400 MB touched: the "earlier job"
    del big
    before = JobMemory(CPU, proc=Path("/nonexistent")).peaks()  # the process's peak so far
    memory = JobMemory(CPU)
    memory.start_job()
    small = np.ones(20 * 2**20 // 8)  # this job's own 20 MB
    peak = memory.peaks()
    del small
    assert before.scope == "process" and before.rss_mb > 400
    assert peak.scope == "job"
    assert peak.rss_mb < before.rss_mb - 300  # the 400 MB are not in the job's peak
    assert peak.cuda_mb is None


def test_without_a_resettable_peak_the_process_figure_is_labelled_so(tmp_path: Path) -> None:
    memory = JobMemory(CPU, proc=tmp_path / "no-such-proc")
    memory.start_job()
    peak = memory.peaks()
    assert peak.scope == "process" and peak.rss_mb > 0


def test_the_job_peak_is_read_from_vmhwm(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "status").write_text("Name:\tpython\nVmPeak:\t 9999 kB\nVmHWM:\t  204800 kB\nVmRSS:\t 1024 kB\n")
    memory = JobMemory(CPU, proc=proc)
    memory.start_job()
    assert (proc / "clear_refs").read_text() == "5"  # the reset request the kernel takes
    assert memory.peaks() == PeakMemory(200.0, "job", None)


def test_the_cuda_branch_resets_and_reads_the_devices_allocator_peak(monkeypatch, tmp_path: Path) -> None:
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        lambda device: calls.append(("read", device)) or 3 * 2**30)
    gpu = torch.device("cuda", 1)
    memory = JobMemory(gpu, proc=tmp_path / "no-such-proc")
    memory.start_job()
    peak = memory.peaks()
    assert calls == [("reset", gpu), ("read", gpu)]
    assert peak.cuda_mb == 3072.0 and peak.scope == "process"
