"""Print how long the quickstart should take on this machine, before it starts.

Its compute scales with the speed of one core's matrix products in the precision `model.dtype: auto` picks
here; the reference is the quickstart measured on a machine of known speed (README, "Quickstart times").
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moelora_ds.training.precision import resolve_dtype  # noqa: E402

REFERENCE = {"machine": "AMD EPYC with AVX512-BF16 (bf16)", "cores": 2, "gflops": 497.0, "setup_s": 210.0,
             "compute_s": 575.0}
"""The measured reference run: its cores, one core's 1024^3 matmul GFLOP/s, the setup (installs, on a fresh
machine) and the rest of the job (data, model conversion, evaluations, training, export), in seconds."""


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


def main() -> None:
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        print("== expected duration: the reference was measured on CPUs; the progress bar's ETA applies here")
        return
    dtype = resolve_dtype("auto", announce=False)
    gflops = matmul_gflops(getattr(torch, dtype))
    cores = os.cpu_count() or 1
    compute_s = REFERENCE["compute_s"] * (REFERENCE["gflops"] / gflops) * (REFERENCE["cores"] / cores)
    minutes = (REFERENCE["setup_s"] + compute_s) / 60
    print(f"== expected duration here: about {minutes:.0f} min ({dtype}, one core {gflops:.0f} GFLOP/s, {cores} cores; "
          f"reference: {(REFERENCE['setup_s'] + REFERENCE['compute_s']) / 60:.0f} min on a {REFERENCE['machine']} "
          f"at {REFERENCE['gflops']:.0f} GFLOP/s per core)", flush=True)


if __name__ == "__main__":
    main()
