"""Weights & Biases: one run (project WANDB_PROJECT, default moelora-ds); WANDB_MODE, WANDB_DIR, WANDB_ENTITY and the
other WANDB_* variables act as W&B documents them. Local files go to WANDB_DIR, else the output directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from moelora_ds.telemetry.trackers import TrackedRun

DEFAULT_PROJECT = "moelora-ds"


class WandbTracker:
    """A `wandb.init` run with the configuration as its config; artifacts saved to the run's files."""

    def __init__(self, run: TrackedRun) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), name=run.name,
                              config=run.params, dir=os.environ.get("WANDB_DIR", str(run.output_dir)))

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def log_artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self) -> None:
        self.run.finish()


def open_tracker(run: TrackedRun) -> WandbTracker:
    return WandbTracker(run)
