"""Print how long the rest of the quickstart should take on this machine, before it starts.

Where this kind of CPU has a measured quickstart (README, "Quickstart times"), that measurement is the estimate,
scaled by the number of cores; elsewhere the nearest measured kind's time is scaled by one core's matrix-product
speed in the precision `model.dtype: auto` picks here (the job is not all matrix products, so such an estimate is
rougher).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moelora_ds.training.precision import cpu_flags, resolve_dtype  # noqa: E402


@dataclass(frozen=True)
class Measured:
    """A quickstart measured on one kind of CPU, with everything installed."""

    machine: str
    cores: int
    job_s: float
    """Everything after setup: data, model conversion, two evaluations, 150 training steps, export, questions."""
    gflops: Optional[float] = None
    """One core's 1024^3 matrix product in the chosen precision, GFLOP/s (matmul_gflops), where it was measured."""


MEASURED = {
    "amx_bf16": Measured("Intel Xeon with AMX (bf16)", 2, job_s=1030.0),
    "avx512_bf16": Measured("AMD EPYC with AVX512-BF16 (bf16)", 2, job_s=575.0, gflops=497.0),
}
"""By the CPU flag that decides the kind (checked in this order)."""
SCALED_FROM = "avx512_bf16"
"""The measured kind an unmeasured CPU is scaled from by matrix-product speed."""


def cpu_kind(flags: set[str]) -> str | None:
    """The measured kind this CPU is (its first flag found in MEASURED), or None."""
    return next((flag for flag in MEASURED if flag in flags), None)


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 3) -> float:
    """One thread's speed at an n^3 matrix product in `dtype` (the best of `repeats`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    torch.set_num_threads(threads)
    return 2 * n ** 3 / best / 1e9


def estimate(flags: set[str], cores: int, gflops: float) -> tuple[float, str]:
    """(seconds, basis) for the job after setup on a CPU with `flags`, `cores` and one core's `gflops`."""
    kind = cpu_kind(flags)
    if kind is not None:
        ref = MEASURED[kind]
        return ref.job_s * ref.cores / cores, f"measured on {ref.machine}, {ref.cores} cores: {ref.job_s:.0f} s"
    ref = MEASURED[SCALED_FROM]
    return (ref.job_s * (ref.gflops / gflops) * (ref.cores / cores),
            f"scaled from {ref.machine} by matrix-product speed, {gflops:.0f} vs {ref.gflops:.0f} GFLOP/s per core")


def main() -> None:
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        print("== expected duration: the reference was measured on CPUs; the progress bar's ETA applies here")
        return
    dtype = resolve_dtype("auto", announce=False)
    flags, cores = cpu_flags(), os.cpu_count() or 1
    gflops = matmul_gflops(getattr(torch, dtype)) if cpu_kind(flags) is None else 0.0
    seconds, basis = estimate(flags, cores, gflops)
    print(f"== expected duration from here: about {seconds / 60:.0f} min ({dtype}, {cores} cores; {basis})", flush=True)


if __name__ == "__main__":
    main()
