"""Preemption signals: SIGUSR1 (SLURM's `--signal` warning before the time limit) and SIGTERM (scancel, preemption
with requeue, a node drain, the launchers passing on their own SIGTERM) ask the run to checkpoint at the next step
boundary and exit with EXIT_CHECKPOINTED_ON_SIGNAL.

A handler only sets a flag: the step in flight finishes, every rank learns of the flag in the all-reduce each
step makes already, and all ranks checkpoint together. SLURM sends SIGKILL KillWait (30 s by default) after
SIGTERM, and the deepspeed launcher 30 s after passing SIGTERM on: a step and an adapter-sized save fit.
"""

from __future__ import annotations

import signal
from typing import Optional

EXIT_CHECKPOINTED_ON_SIGNAL = 75
"""Exit status after a preemption signal was answered with a checkpoint: requeue and resume."""
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Set by SIGUSR1 or SIGTERM (installed at construction); `name` says which arrived first on this rank."""

    def __init__(self) -> None:
        self.name: Optional[str] = None
        for signum in PREEMPTION_SIGNALS:
            signal.signal(signum, self._handle)

    @property
    def raised(self) -> bool:
        return self.name is not None

    def _handle(self, signum, frame) -> None:
        self.name = self.name or signal.Signals(signum).name
