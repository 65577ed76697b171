"""What a training step's metrics record holds besides its loss and learning rate: time, throughput, labelled tokens,
gradient norm, and at logged steps the peak memory of the logging interval and the MFU estimate (README, "Metrics")."""

from __future__ import annotations

from typing import Optional

from torch import nn

from moelora_ds.telemetry.memory import PeakMemory
from moelora_ds.telemetry.mfu import ModelFlopsUtilisation


class StepFigures:
    """`step(...)` gives a step's figures (the sums over ranks are the caller's); `logged(record)` adds rank 0's peak
    memory since the last logged step and the MFU, then starts the next interval."""

    def __init__(self, model: nn.Module, half_precision: bool, world_size: int) -> None:
        self.world_size = world_size
        self.peak_memory = PeakMemory()
        self.mfu = ModelFlopsUtilisation(model, half_precision)

    def step(self, seconds: float, tokens: float, labelled: float, grad_norm: Optional[float]) -> dict:
        """`tokens` (non-padding) and `labelled` summed over ranks; `grad_norm` None where nobody computed one."""
        tokens_per_s = tokens / seconds
        figures = {"step_time_s": seconds, "tokens_per_s": tokens_per_s,
                   "tokens_per_s_per_device": tokens_per_s / self.world_size, "labelled_tokens": int(labelled)}
        if grad_norm is not None:
            figures["grad_norm"] = grad_norm
        return figures

    def logged(self, record: dict) -> None:
        record["peak_memory_gb"] = self.peak_memory.gb()
        record.update(self.mfu.figures(record["tokens_per_s_per_device"]))
        self.peak_memory.reset()
