"""TensorBoard and log-file helpers. Metric tags are ``split/metric`` (``train/loss``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)


class Tracker:
    """A thin TensorBoard writer for one run directory (events in ``<run dir>/tensorboard``)."""

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        # purge_step: events at this step or later from earlier writers are hidden (a resumed run
        # re-logs the steps a killed process had logged after its last checkpoint).
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def image_file(self, tag: str, path: Path, step: int) -> None:
        """Log a PNG written for the report, so TensorBoard shows exactly the same picture."""
        import matplotlib.image

        pixels = matplotlib.image.imread(path)[..., :3]  # (H, W, 3) floats in [0, 1]
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        # run_name="." keeps the HParams record inside this run's own log directory.
        self.writer.add_hparams(hparams, metrics, run_name=".")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class NullTracker:
    """What a rank other than 0 logs to TensorBoard: nothing (rank 0 alone writes the run)."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def add_file_log(run_dir: Path, name: str = "train.log") -> logging.Handler:
    """Also log to ``<run dir>/<name>`` (appending, so a resumed run keeps its history)."""
    handler = logging.FileHandler(run_dir / name, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler
