"""Rank-0 reporting: progress bar, metrics.jsonl, the experiment trackers (train.report_to) and the loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from moelora_ds.telemetry.trackers import Trackers

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


def read_metrics(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class MetricsLogger:
    """Writes one JSON object per logged step, and its numbers to the trackers; on resume, drops lines past the step
    it resumes from. `add_artifact` names files the trackers get when the logger closes (with the loss curve)."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int,
                 trackers: Optional[Trackers] = None, plots: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.plots = plots
        """Whether to draw the loss curve at close (train.plots)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        kept = [r for r in read_metrics(self.output_dir) if r.get("step", 0) <= start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.trackers = trackers
        self.artifacts: list[Path] = []

    def advance(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        self.progress.n = step
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.progress.refresh()

    def log(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.scalars({k: v for k, v in record.items() if k != "step"}, record["step"])

    def scalars(self, values: dict, step: int) -> None:
        """The numbers among `values` to the trackers only (metrics.jsonl keeps the compact record)."""
        if self.trackers is not None:
            self.trackers.log_metrics(values, step)

    def add_artifact(self, path: Optional[Path]) -> None:
        """A file for the trackers at close (None: nothing was written)."""
        if path is not None:
            self.artifacts.append(Path(path))

    def write(self, message: str) -> None:
        self.progress.write(message)

    def close(self) -> Optional[Path]:
        """End the progress bar, draw the loss curve (its path, or None) and hand it and the artifacts to the trackers,
        which then end their runs."""
        self.progress.close()
        curve = plot_loss_curve(self.output_dir) if self.plots else None
        if self.trackers is not None:
            self.trackers.log_artifacts([*self.artifacts, *([curve] if curve else [])])
            self.trackers.close()
        return curve


def plot_loss_curve(output_dir: Path) -> Optional[Path]:
    """Train and eval loss against step, from metrics.jsonl; None when matplotlib is missing or nothing was logged."""
    records = read_metrics(output_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(*zip(*train), label="train loss")
    if evals:
        axis.plot(*zip(*evals), "o-", label="eval loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    axis.grid(alpha=0.3)
    path = Path(output_dir) / LOSS_CURVE_FILE
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
