"""A minimal multi-rank job: rendezvous through moelora_ds.distributed, one all_reduce, one JSON line per rank.

Run by the SLURM and MPI tests (`srun python tests/allreduce_probe.py`, `mpirun -np 2 python ...`).
"""

import json
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from moelora_ds.distributed.process_group import end_rank_process, init_distributed, say  # noqa: E402

SCRIPT = Path(__file__).resolve()


def probe_reports(output: str) -> list[dict]:
    """The ranks' reports found in a job's output, by rank."""
    return sorted((json.loads(line.split("PROBE ", 1)[1]) for line in output.splitlines() if "PROBE " in line),
                  key=lambda report: report["rank"])


if __name__ == "__main__":
    rank, world_size = init_distributed()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    report = {"rank": rank, "world_size": world_size, "sum": value.item(), "backend": dist.get_backend(),
              "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
              "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR",
                                                     "MASTER_PORT")}}
    say("PROBE " + json.dumps(report))
    end_rank_process(0)
