"""Rank-0 reporting: progress bar, metrics.jsonl, TensorBoard (when installed) and the loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


def read_metrics(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class MetricsLogger:
    """Writes one JSON object per logged step; on resume, drops lines past the step it resumes from."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        kept = [r for r in read_metrics(self.output_dir) if r.get("step", 0) <= start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.tensorboard = self._open_tensorboard()

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))

    def advance(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        self.progress.n = step
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.progress.refresh()

    def log(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.scalars({k: v for k, v in record.items() if k != "step"}, record["step"])

    def scalars(self, values: dict, step: int) -> None:
        """The numbers among `values` to TensorBoard only (metrics.jsonl keeps the compact record)."""
        if self.tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)

    def write(self, message: str) -> None:
        self.progress.write(message)

    def close(self) -> Optional[Path]:
        self.progress.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        return plot_loss_curve(self.output_dir)


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
