"""The learning-rate schedule: linear warm-up, then constant, linear or cosine decay."""

from __future__ import annotations

import math
from typing import Callable

import torch

from moelora_ds.config import SchedulerConfig


def lr_multiplier(config: SchedulerConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up from 0, then constant / linear / cosine decay to min_lr_ratio at the last step."""
    warmup, floor = config.warmup_steps, config.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
        if config.name == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def scheduler_factory(config: SchedulerConfig, total_steps: int):
    """A callable DeepSpeed builds the scheduler with, on the optimizer it wraps."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config, total_steps))
