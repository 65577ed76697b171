"""Run a Python script (a training launcher) and record this rank's peak memory when it exits.

    deepspeed --num_gpus 2 benchmarks/peak_memory.py launcher/train.py --config CFG [overrides]

With BENCH_MEMORY_DIR set, each rank writes BENCH_MEMORY_DIR/rank{RANK}.json at exit:
{"rank", "world_size", "vmhwm_kib" (VmHWM of /proc/self/status: peak resident set), "ru_maxrss_kib"}, and
on CUDA "gpu_peak_mib" (torch.cuda.max_memory_allocated).
The script runs as __main__ with the remaining arguments, exactly as if started directly.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import runpy
import sys
from pathlib import Path


def peak_memory_kib() -> dict[str, int]:
    hwm = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    except OSError:
        pass
    return {"vmhwm_kib": hwm, "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def _write_record() -> None:
    out = os.environ.get("BENCH_MEMORY_DIR")
    if not out:
        return
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), **peak_memory_kib()}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        record["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))


def main() -> None:
    # the deepspeed launcher puts --local_rank=N first: it is passed on to the script
    launcher_args = [a for a in sys.argv[1:] if a.startswith("--local_rank") or a.startswith("--local-rank")]
    rest = [a for a in sys.argv[1:] if a not in launcher_args]
    if not rest:
        raise SystemExit("usage: peak_memory.py SCRIPT [ARGS...]")
    script = rest[0]
    sys.argv = [script, *launcher_args, *rest[1:]]
    sys.path.insert(0, str(Path(script).resolve().parent))
    atexit.register(_write_record)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
