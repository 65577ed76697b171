"""The launch environment (deepspeed launcher, torchrun, srun, mpirun) as one rendezvous.

`rendezvous_from_env` is pure: it reads a process environment and returns the torch.distributed
variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE, CROSS_RANK, CROSS_SIZE, MASTER_ADDR, MASTER_PORT)
this rank should run with; process_group.init_distributed exports them and starts the process group.
"""

from __future__ import annotations

import re
import socket
import subprocess
from typing import Mapping, Optional

from moelora_ds.distributed.slurm_nodelist import expand_nodelist, expand_tasks_per_node

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torch.distributed's env:// rendezvous needs (the deepspeed launcher and torchrun set all of them)."""
DEFAULT_MASTER_PORT = 29500
ANY_FREE_PORT = "0"
SLURM_PORT_BASE = 15000
"""Under SLURM, MASTER_PORT defaults to SLURM_PORT_BASE + the job id's last four digits (15000-24999), moved by
RESTART_PORT_STRIDE per restart of a requeued job."""
RESTART_PORT_STRIDE = 1009
"""A requeued job's restart N listens RESTART_PORT_STRIDE * N ports further on (modulo 10000): its previous run's
sockets can hold the old port for a minute (TCP TIME_WAIT) after that run ended."""


class LaunchEnvironmentError(RuntimeError):
    """The environment describes no consistent set of ranks; the message names the variable at fault."""


def detect_launcher(env: Mapping[str, str]) -> str:
    """Who started this process: `env` (deepspeed launcher, torchrun: RANK is set), `mpi`, `slurm` or `single`.

    An srun step (SLURM_STEP_ID) counts as `slurm` even when srun's PMI/PMIx plugin set MPI variables,
    as its task numbering is the MPI numbering. OpenMPI's mpirun (OMPI_COMM_WORLD_SIZE), and an MPICH-style
    mpiexec whose PMI_SIZE differs from the step's task count (its proxies were started by srun), count as
    `mpi`. A SLURM batch script that is not inside an srun step is a single process.
    """
    if "RANK" in env or "WORLD_SIZE" in env:
        return "env"
    if "OMPI_COMM_WORLD_SIZE" in env:
        return "mpi"
    in_step = "SLURM_STEP_ID" in env
    if "PMI_SIZE" in env and not (in_step and env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
                                  == env["PMI_SIZE"]):
        return "mpi"
    if in_step:
        return "slurm"
    if "PMIX_RANK" in env or "PMI_RANK" in env:
        return "mpi"
    return "single"


def _int(env: Mapping[str, str], *names: str, required: str = "") -> Optional[int]:
    """The first of `names` that is set, as an int; None if none is set and no `required` context is given."""
    for name in names:
        if name in env:
            try:
                return int(env[name])
            except ValueError:
                raise LaunchEnvironmentError(f"{name}={env[name]!r} is not an integer") from None
    if required:
        raise LaunchEnvironmentError(f"{required}, but {' / '.join(names)} is not set")
    return None


def _slurm_rendezvous(env: Mapping[str, str]) -> dict[str, str]:
    where = "inside an srun step (SLURM_STEP_ID is set)"
    rank = _int(env, "SLURM_PROCID", required=where)
    world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", required=where)
    local_rank = _int(env, "SLURM_LOCALID", required=where)
    node_rank = _int(env, "SLURM_NODEID", required=where)
    num_nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", required=where)
    if not 0 <= rank < world:
        raise LaunchEnvironmentError(f"SLURM_PROCID={rank} is outside 0..{world - 1} "
                                     f"(SLURM_STEP_NUM_TASKS/SLURM_NTASKS)")
    if not 0 <= node_rank < num_nodes:
        raise LaunchEnvironmentError(f"SLURM_NODEID={node_rank} is outside 0..{num_nodes - 1} (SLURM_STEP_NUM_NODES)")
    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
           "CROSS_RANK": str(node_rank), "CROSS_SIZE": str(num_nodes)}
    per_node_var = next((v for v in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if v in env), None)
    if per_node_var is not None:
        try:
            per_node = expand_tasks_per_node(env[per_node_var])
        except ValueError as error:
            raise LaunchEnvironmentError(f"{per_node_var}: {error}") from None
        if len(per_node) != num_nodes or not 0 <= local_rank < per_node[node_rank]:
            raise LaunchEnvironmentError(f"{per_node_var}={env[per_node_var]!r} does not fit SLURM_NODEID={node_rank}, "
                                         f"SLURM_LOCALID={local_rank} and {num_nodes} nodes")
        out["LOCAL_SIZE"] = str(per_node[node_rank])
    if "MASTER_ADDR" not in env:
        nodelist_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if v in env),
                            None)
        if nodelist_var is None:
            raise LaunchEnvironmentError(f"{where}, but neither MASTER_ADDR nor SLURM_STEP_NODELIST / "
                                         f"SLURM_JOB_NODELIST / SLURM_NODELIST is set")
        try:
            out["MASTER_ADDR"] = expand_nodelist(env[nodelist_var])[0]
        except ValueError as error:
            raise LaunchEnvironmentError(f"{nodelist_var}: {error}") from None
    if "MASTER_PORT" not in env:
        job_id = _int(env, "SLURM_JOB_ID", "SLURM_JOBID", required=f"{where} and MASTER_PORT is not set")
        restarts = _int(env, "SLURM_RESTART_COUNT") or 0
        out["MASTER_PORT"] = str(SLURM_PORT_BASE + (job_id + RESTART_PORT_STRIDE * restarts) % 10000)
    return out


def _mpi_rendezvous(env: Mapping[str, str]) -> dict[str, str]:
    """What the MPI launcher's variables tell; MASTER_ADDR stays unset unless given (MPI discovery finds it)."""
    names = {"RANK": ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"),
             "WORLD_SIZE": ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"),
             "LOCAL_RANK": ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"),
             "LOCAL_SIZE": ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")}
    out = {}
    for key, sources in names.items():
        value = _int(env, *sources)
        if value is not None:
            out[key] = str(value)
    if "RANK" in out and "WORLD_SIZE" in out and not 0 <= int(out["RANK"]) < int(out["WORLD_SIZE"]):
        raise LaunchEnvironmentError(f"MPI rank {out['RANK']} is outside 0..{int(out['WORLD_SIZE']) - 1}")
    if "MASTER_ADDR" in env:
        out["MASTER_ADDR"] = env["MASTER_ADDR"]
    out["MASTER_PORT"] = str(_int(env, "MASTER_PORT") or DEFAULT_MASTER_PORT)
    return out


def rendezvous_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables this rank runs with, given its process environment.

    Variables already in `env` win over derived ones. Under a launcher that sets RANK all of TORCH_VARS
    must be set. Under srun they come from SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS),
    SLURM_LOCALID, SLURM_NODEID, the first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) and a
    port derived from SLURM_JOB_ID. Under mpirun the MPI variables give the ranks; MASTER_ADDR is absent
    (unless set) and is then found by DeepSpeed's MPI discovery. A lone process is rank 0 of 1 on
    127.0.0.1 with MASTER_PORT "0" (ANY_FREE_PORT: init_distributed picks one; DeepSpeed names its
    shared-memory segments after the master address and port, so lone processes must not share one).
    Raises LaunchEnvironmentError naming the variable when the environment is inconsistent.
    """
    launcher = detect_launcher(env)
    if launcher == "env":
        missing = [name for name in TORCH_VARS if name not in env]
        if missing:
            given = [name for name in TORCH_VARS if name in env]
            raise LaunchEnvironmentError(f"{', '.join(given)} set but {', '.join(missing)} not: set all of "
                                         f"{', '.join(TORCH_VARS)} or none (srun, mpirun and the deepspeed "
                                         f"launcher set them)")
        _int(env, "RANK")
        _int(env, "WORLD_SIZE")
        derived: dict[str, str] = {}
    elif launcher == "slurm":
        derived = _slurm_rendezvous(env)
    elif launcher == "mpi":
        derived = _mpi_rendezvous(env)
    else:
        derived = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_SIZE": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": ANY_FREE_PORT}
    return {**derived, **{k: env[k] for k in (*TORCH_VARS, "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE") if k in env}}


def reachable_master_addr(host: str, env: Mapping[str, str]) -> str:
    """`host` if it resolves here, else its NodeAddr from `scontrol show node` (node names need not be DNS names)."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except socket.gaierror:
        pass
    try:
        result = subprocess.run(["scontrol", "show", "node", "-o", host], env=dict(env), capture_output=True,
                                text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise LaunchEnvironmentError(f"MASTER_ADDR={host!r} does not resolve and scontrol failed: {error}") from None
    match = re.search(r"\bNodeAddr=(\S+)", result.stdout)
    if result.returncode != 0 or not match:
        raise LaunchEnvironmentError(f"MASTER_ADDR={host!r} does not resolve and `scontrol show node {host}` gives "
                                     f"no NodeAddr: {result.stderr.strip()}")
    return match.group(1)
