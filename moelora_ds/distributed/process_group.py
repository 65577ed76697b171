"""The process group: starting it under any launcher, the collectives the trainer shares, and leaving it.

`init_distributed` exports the rendezvous variables this rank runs with (rendezvous.py) and starts
DeepSpeed's process group on the accelerator's backend, bound to the rank's device on an accelerator.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import NoReturn, Optional

from moelora_ds.distributed.rendezvous import (
    ANY_FREE_PORT,
    LaunchEnvironmentError,
    detect_launcher,
    reachable_master_addr,
    rendezvous_from_env,
)


def local_rank() -> int:
    """This process's rank on its node (the deepspeed launcher, torchrun and srun set LOCAL_RANK; mpirun its own)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))


def all_sum(values: list, device) -> list[float]:
    """The element-wise sum of `values` (numbers or device scalars) over all ranks, as Python floats on every rank.

    One all-reduce (fp64) and, when any value is a tensor, one read back to the host: device scalars are
    gathered on the device first, so they cost one synchronisation together, not one each."""
    import torch
    import torch.distributed as dist

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if not distributed and not any(torch.is_tensor(v) for v in values):
        return [float(v) for v in values]
    tensor = torch.stack([v.detach().to(device, torch.float64).reshape(()) if torch.is_tensor(v)
                          else torch.tensor(float(v), dtype=torch.float64, device=device) for v in values])
    if distributed:
        dist.all_reduce(tensor)
    return tensor.tolist()


def all_sum_tensor(tensor):
    """`tensor` summed over all ranks in place (one all-reduce; unchanged outside a multi-rank group), returned."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def require_mpi4py() -> None:
    """Fail with what to install when ranks started by mpirun must find their master through MPI and mpi4py is
    missing (it is the optional extra `moelora-ds[mpi]`)."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise LaunchEnvironmentError(
            "started by mpirun without MASTER_ADDR: the ranks find their master through MPI, which needs mpi4py; "
            "install it with `pip install 'moelora-ds[mpi]'` (or `pip install mpi4py`, with Debian's libopenmpi-dev), "
            "or set MASTER_ADDR and MASTER_PORT for every rank") from None


def init_distributed(timeout_s: Optional[int] = None) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed and return (rank, world_size).

    Works under the deepspeed launcher, torchrun, srun (one task per rank), mpirun (DeepSpeed's MPI
    discovery via mpi4py) and as a lone process, then makes the LOCAL_RANK-th device current. Each rank
    started by srun or mpirun, and a lone process, prints one line saying how it was placed.
    `timeout_s` bounds every collective (DeepSpeed's default, 30 minutes, when None): a rank whose peer
    hangs fails after that long instead of waiting forever.
    """
    from datetime import timedelta

    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        launcher = detect_launcher(os.environ)
        rendezvous = rendezvous_from_env(os.environ)
        if launcher == "slurm" and "MASTER_ADDR" not in os.environ:
            rendezvous["MASTER_ADDR"] = reachable_master_addr(rendezvous["MASTER_ADDR"], os.environ)
        if rendezvous.get("MASTER_PORT") == ANY_FREE_PORT:
            rendezvous["MASTER_PORT"] = str(_free_port())
        for key, value in rendezvous.items():
            os.environ.setdefault(key, value)
        discover = "MASTER_ADDR" not in rendezvous
        if discover:
            require_mpi4py()
        if launcher != "env":
            node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
            master = "via MPI" if discover else f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            say(f"[moelora-ds] rank {rendezvous.get('RANK', '?')}/{rendezvous.get('WORLD_SIZE', '?')} "
                f"(local {rendezvous.get('LOCAL_RANK', '?')}) on {node} via {launcher}, master {master}")
            if launcher == "single" and os.environ.get("SLURM_NTASKS", "1") != "1":
                say(f"[moelora-ds] warning: this SLURM job has {os.environ['SLURM_NTASKS']} tasks but this process "
                    f"was not started by srun; start one rank per task with `srun python ...`")
        timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        port = int(rendezvous["MASTER_PORT"])
        backend = get_accelerator().communication_backend_name()
        if bound_device(get_accelerator(), 0) is not None:  # DeepSpeed passes no device_id: start the group here
            if discover:
                from deepspeed.comm.comm import mpi_discovery

                mpi_discovery(distributed_port=port, verbose=False)
                discover = False
            from deepspeed.constants import default_pg_timeout

            local = int(os.environ["LOCAL_RANK"])
            get_accelerator().set_device(local)
            dist.init_process_group(backend, **{"timeout": default_pg_timeout, **timeout},
                                    device_id=bound_device(get_accelerator(), local))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=discover, distributed_port=port,
                                   verbose=False, **timeout)
        # Every rank may see all devices of its node (srun, the deepspeed launcher): use the LOCAL_RANK-th one,
        # so that tensors put on `current_device()` before deepspeed.initialize land where the engine expects them.
        get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
        share_cpu_threads()
        release_shm_comm_buffer()
    return dist.get_rank(), dist.get_world_size()


def bound_device(accelerator, local_rank: int):
    """The device a rank's process group is bound to (`init_process_group(device_id=...)`): on an accelerator its
    LOCAL_RANK-th device, on the CPU (gloo) none.

    Bound, NCCL knows from the start which device each rank drives; unbound, it guesses from the global
    rank and warns that this can hang. DeepSpeed 0.19 binds only on CUDA and only at world size > 1.
    """
    import inspect

    import torch
    import torch.distributed as dist

    if accelerator.device_name() == "cpu" or "device_id" not in inspect.signature(dist.init_process_group).parameters:
        return None
    return torch.device(accelerator.device_name(local_rank))


def release_shm_comm_buffer() -> None:
    """Unlink this rank's /dev/shm segment of DeepSpeed's CPU shared-memory all-reduce once every rank has mapped it.

    DeepSpeed 0.19.8 creates one ~66 MB segment per rank and never unlinks it: every run left them behind until
    /dev/shm filled and ranks were OOM-killed. After the barrier all peers hold their mappings, so the
    name can go now and the memory is freed when the ranks exit, however they exit.
    """
    import torch.distributed as dist

    path = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                               f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    dist.barrier()
    path.unlink(missing_ok=True)


def wait_for_every_rank_to_report(timeout_s: float = 20.0) -> None:
    """Called by a rank that failed before the process group exists (preflight), after it printed its message:
    return once every rank of the launch has printed too, or after `timeout_s`.

    The deepspeed launcher (0.19.8) and torchrun kill all ranks as soon as one exits non-zero, so a rank that
    exits at once can cut off a slower rank's message. The ranks meet at a TCPStore on MASTER_ADDR:MASTER_PORT
    (rank 0 serves it, or torchrun's agent store does), the port the never-created process group would have
    used. Best effort: a lone process, MPI discovery (no MASTER_ADDR) or a store error returns at once; a rank
    whose peers passed preflight (they never come) returns after `timeout_s` and the launcher then ends them.
    """
    from datetime import timedelta

    try:
        rendezvous = rendezvous_from_env(os.environ)
        world, rank = int(rendezvous["WORLD_SIZE"]), int(rendezvous["RANK"])
        addr, port = rendezvous.get("MASTER_ADDR"), int(rendezvous.get("MASTER_PORT", ANY_FREE_PORT))
    except (LaunchEnvironmentError, KeyError, ValueError):
        return
    if world <= 1 or addr is None or port == 0:
        return
    from torch.distributed import TCPStore

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    key = f"moelora/preflight_failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        store = TCPStore(addr, port, world_size=world, is_master=rank == 0 and not agent_store,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        if store.add(key, 1) >= world:
            store.set(key + "/all", "1")
        store.wait([key + "/all"])
    except Exception:  # a timeout or a vanished peer: exit anyway
        return


def say(message: str, stream=None) -> None:
    """Write `message` as one line in a single write (stdout by default), so that the lines of ranks
    sharing a pipe never interleave: print() writes the text and the newline separately."""
    stream = sys.stdout if stream is None else stream
    stream.write(message + "\n")
    stream.flush()


def end_rank_process(code: int) -> NoReturn:
    """Leave the process group and exit with `code`, skipping the interpreter's teardown.

    DeepSpeed 0.19.8 keeps references to its Gloo process groups after destroy_process_group, so their worker
    threads are still running when the interpreter finalizes; destroying them then aborts the process
    now and then ("terminate called without an active exception", exit 250 from the launcher) after a
    run that succeeded. Python's atexit handlers still run (a profiler's or a logger's); only the
    interpreter's finalization is skipped. MPI (loaded when the ranks discovered each other through
    mpi4py) is finalized, or mpirun reports the exit as abnormal.
    """
    import atexit

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def share_cpu_threads() -> None:
    """On the CPU accelerator, give each of a node's ranks its share of the cores (unless OMP_NUM_THREADS is set).

    Without it every rank starts one thread per core: with 2 ranks on 2 cores, eval ran 3.5x slower.
    """
    import torch
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
