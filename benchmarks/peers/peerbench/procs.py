"""Child processes with their peak RSS, the shared thread settings, and steady-state rates.

Every toolkit runs as a child process whose output goes to its own log file. ``os.wait4`` gives
the child's own resource usage, so each training process gets its own peak RSS (the largest of
the process and any children it waited for), not the maximum over all children so far.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit))\b:?\s*(.*)$")


class BenchError(Exception):
    """A toolkit step failed. The message is one line and names the log to read."""


@dataclass(frozen=True)
class ProcResult:
    returncode: int
    wall_s: float
    peak_rss_mb: float
    started: float  # time.time() at launch, comparable with log timestamps


@dataclass(frozen=True)
class StepPoint:
    """One logged update: its number, when it ended, and the target tokens of the updates since
    the previous point (so a window's tokens are the sum over its points)."""

    step: int
    time: float  # seconds on any clock shared by all points of one run
    tokens: float


@dataclass(frozen=True)
class Window:
    """The steady-state window of a training run: updates ``first_step`` + 1 to ``last_step``."""

    first_step: int
    last_step: int
    tokens: float
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def child_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: the same thread count for all toolkits, no hub access."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    # The weights-only escape hatch is for OpenNMT-py's own translate process only (see onmt.py).
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env.update(extra or {})
    return env


def run_logged(cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None,
               append: bool = False) -> ProcResult:
    """Run ``cmd`` with stdout and stderr into ``log``; wait for it and return its usage."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a" if append else "w", encoding="utf-8") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        started, t0 = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C: stop the child we started, then give up
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
    return ProcResult(returncode=proc.returncode, wall_s=wall, peak_rss_mb=usage.ru_maxrss / 1024,
                      started=started)


def check_ok(result: ProcResult, what: str, log: Path) -> None:
    if result.returncode != 0:
        raise BenchError(f"{what} exited with status {result.returncode}: {last_error_line(log)} "
                         f"(log: {log})")


def last_error_line(log: Path) -> str:
    """The most telling line of a failed child's log: its last exception line (with the source
    line above it when the exception has no message), or else its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines()
                 if ln.strip()]
    except OSError:
        return "no log"
    for i in range(len(lines) - 1, -1, -1):
        m = EXCEPTION_LINE.match(lines[i])
        if m:
            if not m.group(2) and i > 0:  # a bare `AssertionError`: show the failing statement
                return f"{lines[i - 1][:160]} ({m.group(1)})"
            return lines[i][:200]
        if lines[i].startswith("error:"):
            return lines[i][:200]
    return lines[-1][:200] if lines else "empty log"


def log_time(stamp: str) -> float:
    """``2026-11-21 02:20:42,123`` (Python logging's asctime, local time) as epoch seconds."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def steady_window(points: list[StepPoint], warmup_steps: int) -> Window:
    """Tokens and seconds from the last point at or before ``warmup_steps`` to the final point."""
    pts = sorted(points, key=lambda p: p.step)
    before = [p for p in pts if p.step <= warmup_steps]
    if not before or pts[-1].step <= before[-1].step:
        raise BenchError(f"too few logged updates for a steady-state window after {warmup_steps} "
                         f"warm-up updates (logged: {[p.step for p in pts][:5]}...)")
    start, end = before[-1], pts[-1]
    tokens = sum(p.tokens for p in pts if start.step < p.step <= end.step)
    return Window(first_step=start.step, last_step=end.step, tokens=tokens, seconds=end.time - start.time)
