"""When the trainer checkpoints before the end: every `train.save_every` steps, and once `train.save_every_minutes`
of wall clock have passed since the last checkpoint (or the start).

A save is collective, so every rank must decide alike. The clock is read on rank 0 alone, and its verdict
travels in the all-reduce every step makes already (nonfinite.check_finite_state's): no extra synchronisation.
"""

from __future__ import annotations

import time

from moelora_ds.config import TrainLoopConfig


class SaveCadence:
    """Step and wall-clock checkpoint cadence of one rank."""

    def __init__(self, config: TrainLoopConfig, rank: int) -> None:
        self.every, self.seconds, self.rank = config.save_every, config.save_every_minutes * 60, rank
        self.last_save = time.monotonic()

    def clock_vote(self) -> float:
        """1.0 on rank 0 once the wall-clock interval has passed, else 0.0: summed over ranks, rank 0's verdict."""
        return float(self.rank == 0 and self.seconds > 0 and time.monotonic() - self.last_save >= self.seconds)

    def due(self, step: int, clock_votes: float) -> bool:
        """Whether to checkpoint after `step`, given the summed clock votes of that step."""
        return bool(clock_votes) or (self.every > 0 and step % self.every == 0)

    def saved(self) -> None:
        self.last_save = time.monotonic()
