"""Turning the launch environment (deepspeed launcher, torchrun, mpirun) into an initialised process group."""

from __future__ import annotations

import os

import deepspeed
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed and return (rank, world_size).

    The deepspeed launcher and torchrun set RANK/WORLD_SIZE/MASTER_ADDR; under mpirun DeepSpeed's MPI
    discovery (mpi4py) fills them in.
    """
    if not dist.is_initialized():
        under_mpi = "RANK" not in os.environ and "OMPI_COMM_WORLD_SIZE" in os.environ
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   auto_mpi_discovery=under_mpi)
    return dist.get_rank(), dist.get_world_size()
