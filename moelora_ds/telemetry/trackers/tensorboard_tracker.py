"""TensorBoard: scalars under OUTPUT_DIR/tensorboard (the run's files are already in its output directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from moelora_ds.telemetry.trackers import TrackedRun


class TensorBoardTracker:
    """A SummaryWriter over OUTPUT_DIR/tensorboard."""

    def __init__(self, run: TrackedRun) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.output_dir / "tensorboard"))

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_artifact(self, path: Path) -> None:
        """Nothing to do: TensorBoard's log directory sits next to the run's files."""

    def close(self) -> None:
        self.writer.close()


def open_tracker(run: TrackedRun) -> TensorBoardTracker:
    return TensorBoardTracker(run)
