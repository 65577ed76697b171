"""`python -m moelora_ds.distributed.hostfile --slots N`: a DeepSpeed hostfile for the current SLURM allocation."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from moelora_ds.distributed.slurm_nodelist import expand_nodelist


def hostfile_lines(hosts: Sequence[str], slots: int) -> list[str]:
    """DeepSpeed hostfile lines, `host slots=N`, one per host."""
    if slots < 1:
        raise ValueError(f"slots must be positive, got {slots}")
    return [f"{host} slots={slots}" for host in hosts]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moelora_ds.distributed.hostfile",
                                     description="Print a DeepSpeed hostfile (`host slots=N` lines) for the SLURM "
                                                 "allocation, for `deepspeed --hostfile`.")
    parser.add_argument("--slots", type=int, required=True, help="ranks per host (usually GPUs per node)")
    parser.add_argument("--nodelist", help="a SLURM node list instead of $SLURM_JOB_NODELIST")
    args = parser.parse_args(argv)
    nodelist_var = next((v for v in ("SLURM_JOB_NODELIST", "SLURM_NODELIST") if v in os.environ), None)
    if args.nodelist is None and nodelist_var is None:
        print(f"{parser.prog}: SLURM_JOB_NODELIST is not set (run it inside a SLURM allocation or pass --nodelist)",
              file=sys.stderr)
        return 2
    nodelist = args.nodelist if args.nodelist is not None else os.environ[nodelist_var]
    try:
        lines = hostfile_lines(expand_nodelist(nodelist), args.slots)
    except ValueError as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
