"""Peak memory of this rank per logging interval (metrics.jsonl's `peak_memory_gb`, in GB of 10^9 bytes).

On an accelerator: the most memory the allocator had handed out (deepspeed's `get_accelerator()`'s
max_memory_allocated), reset after each logged step. On the CPU: the process's peak resident set (VmHWM in
/proc/self/status), reset by writing 5 to /proc/self/clear_refs where the kernel lets the process do it;
where it does not (or without /proc: ru_maxrss), the figure is the peak since the process started.
Reading either is a host-side counter: no wait for the device.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

from deepspeed.accelerator import get_accelerator

STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
GB = 1e9


def peak_rss_bytes() -> int:
    """The process's peak resident set since start or the last reset (VmHWM), else ru_maxrss."""
    try:
        found = re.search(r"^VmHWM:\s*(\d+)\s*kB", STATUS.read_text(), re.M)
    except OSError:
        found = None
    if found:
        return int(found.group(1)) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Set the process's peak resident set back to the current one; False where that is not permitted."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """This rank's peak memory since the last `reset()` (or since the process started where the CPU's cannot be
    reset: `resettable` False)."""

    def __init__(self) -> None:
        self.accelerator = get_accelerator()
        self.on_cpu = self.accelerator.device_name() == "cpu"
        self.resettable = self.reset()

    def gb(self) -> float:
        peak = peak_rss_bytes() if self.on_cpu else self.accelerator.max_memory_allocated()
        return peak / GB

    def reset(self) -> bool:
        """Start a new interval; whether the peak could be reset."""
        if self.on_cpu:
            return reset_peak_rss()
        self.accelerator.reset_peak_memory_stats()
        return True
