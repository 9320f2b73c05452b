"""Run directories: what marks one as used, and the lock a training process holds on its own.

A run directory is used once any of a run's files is there (a ``.hydra`` folder, ``train.log``,
``summary.json``, checkpoints, evaluations, TensorBoard logs): a new run never writes into it. A
training process holds an exclusive ``flock`` on ``<run dir>/.lock`` for its whole life, with its
PID in the file; a second trainer on the same directory (a resume started while the run still
trains) stops with one line naming that PID. The kernel drops the lock when the process ends, a
crash or ``kill -9`` included, so a killed run can be resumed at once.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from seq2seq.core.errors import RunDirError

RUN_MARKERS = (".hydra", "train.log", "summary.json", "checkpoints", "eval", "tensorboard")
LOCK_NAME = ".lock"

_held: dict[Path, int] = {}  # run directory -> the open lock file's descriptor, for this process


def run_markers(run_dir: Path) -> list[str]:
    """The files of an earlier run found in ``run_dir`` (empty for a new or empty directory)."""
    return [name for name in RUN_MARKERS if (run_dir / name).exists()]


def lock_run_dir(run_dir: Path) -> None:
    """Hold ``run_dir``'s lock until this process ends (again for a directory it already holds:
    no-op). Raises ``RunDirError`` naming the holder when another process has it."""
    key = run_dir.resolve()
    if key in _held:
        return
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirError(f"cannot create {path} ({err.strerror}); choose a writable run directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirError(f"{run_dir} is in use by another training process (PID {holder}); wait for it to "
                          f"end or stop it (kill {holder}), then resume with trainer.resume={run_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd
