"""Peak memory of one job: resident memory of the process, and the CUDA allocator's peak on a GPU.

A ``-m`` sweep runs its jobs one after another in one process, and the kernel's peak-RSS figure
(``getrusage``'s ``ru_maxrss``) only ever grows: read at the end of a job, it is the peak of every
job so far, so a small model trained after a large one would report the large one's memory. Linux
lets a process reset its resident high-water mark (``VmHWM`` in ``/proc/self/status``) by writing
5 to ``/proc/self/clear_refs``; ``start_job`` does that, and ``job_peaks`` reads it back. Where
that is not possible (another OS, a kernel without it) the process-wide figure is returned with
its scope saying so, never presented as the job's own.
"""

from __future__ import annotations

import logging
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PROC = Path("/proc/self")


@dataclass(frozen=True)
class PeakMemory:
    rss_mb: float  # resident memory high-water mark
    scope: str  # "job": since start_job; "process": since the process started (a sweep's earlier jobs too)
    cuda_mb: float | None = None  # peak memory allocated by torch on the job's CUDA device; None off a GPU


def _reset_rss_peak(proc: Path) -> bool:
    try:
        (proc / "clear_refs").write_text("5")
        return _vm_hwm_mb(proc) is not None
    except OSError:
        return False


def _vm_hwm_mb(proc: Path) -> float | None:
    try:
        for line in (proc / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # the kernel writes kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _process_peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


class JobMemory:
    """``start_job`` when the job starts, ``peaks`` when it ends."""

    def __init__(self, device: torch.device, proc: Path = PROC) -> None:
        self.device = device
        self.proc = proc
        self.per_job = False

    def start_job(self) -> None:
        self.per_job = _reset_rss_peak(self.proc)
        if not self.per_job:
            log.debug("cannot reset the resident-memory peak here: peak_rss_mb is the process's")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self) -> PeakMemory:
        cuda = (round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
                if self.device.type == "cuda" else None)
        hwm = _vm_hwm_mb(self.proc) if self.per_job else None
        if hwm is not None:
            return PeakMemory(hwm, "job", cuda)
        return PeakMemory(_process_peak_mb(), "process", cuda)
