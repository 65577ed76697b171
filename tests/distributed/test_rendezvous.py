"""The pure side of moelora_ds.distributed: launcher detection, rendezvous from real-shaped environments, hostfiles,
the device a process group is bound to."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moelora_ds.distributed.hostfile import hostfile_lines, main
from moelora_ds.distributed.process_group import bound_device
from moelora_ds.distributed.rendezvous import (
    ANY_FREE_PORT,
    DEFAULT_MASTER_PORT,
    LaunchEnvironmentError,
    detect_launcher,
    reachable_master_addr,
    rendezvous_from_env,
)
from moelora_ds.distributed.slurm_nodelist import expand_nodelist

from conftest import REPO

# The environment srun gave task 1 of `sbatch -N2 --ntasks-per-node=1` (job 1) on the test cluster,
# as recorded from `env` (SLURM_* only; everything else is irrelevant to the rendezvous).
SRUN_TASK_ENV = {
    "SLURMD_NODENAME": "node2", "SLURM_CLUSTER_NAME": "moelora-test", "SLURM_CPUS_ON_NODE": "1",
    "SLURM_DISTRIBUTION": "cyclic", "SLURM_GTIDS": "1", "SLURM_JOBID": "1", "SLURM_JOB_CPUS_PER_NODE": "1(x2)",
    "SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "envjob.sh", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2",
    "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1", "SLURM_LOCALID": "0", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
    "SLURM_NODELIST": "node[1-2]", "SLURM_NPROCS": "2", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_PROCID": "1", "SLURM_STEPID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    "SLURM_SUBMIT_DIR": "/tmp", "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_TASK_PID": "5914",
}
# The batch script of the same job: SLURM_PROCID and SLURM_NTASKS are set, but it is not an srun step.
BATCH_ENV = {k: v for k, v in SRUN_TASK_ENV.items() if not k.startswith(("SLURM_STEP", "SLURM_LAUNCH", "SLURM_DISTR"))
             and k != "SLURM_STEPID"} | {"SLURM_PROCID": "0", "SLURM_NODEID": "0", "SLURMD_NODENAME": "node1"}


def srun_env(procid: int, nodeid: int, localid: int, **extra: str) -> dict[str, str]:
    """Task `procid` of a 10-rank step over five nodes, two ranks each, job 4242017."""
    nodelist = "node[01-03,07],gpu5"
    return {"SLURM_JOB_ID": "4242017", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid), "SLURM_NTASKS": "10",
            "SLURM_STEP_NUM_TASKS": "10", "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid),
            "SLURM_STEP_NUM_NODES": "5", "SLURM_NNODES": "5", "SLURM_STEP_NODELIST": nodelist,
            "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist, "SLURM_STEP_TASKS_PER_NODE": "2(x5)",
            "SLURM_TASKS_PER_NODE": "2(x5)", **extra}


def test_srun_task_rendezvous_from_recorded_env():
    assert rendezvous_from_env(SRUN_TASK_ENV) == {
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_SIZE": "1", "CROSS_RANK": "1", "CROSS_SIZE": "2",
        "MASTER_ADDR": "node1", "MASTER_PORT": "15001"}


@pytest.mark.parametrize("procid, nodeid, localid", [(0, 0, 0), (5, 2, 1), (9, 4, 1)])
def test_srun_rendezvous_over_a_compressed_nodelist(procid, nodeid, localid):
    rendezvous = rendezvous_from_env(srun_env(procid, nodeid, localid))
    assert rendezvous == {"RANK": str(procid), "WORLD_SIZE": "10", "LOCAL_RANK": str(localid), "LOCAL_SIZE": "2",
                          "CROSS_RANK": str(nodeid), "CROSS_SIZE": "5", "MASTER_ADDR": "node01",
                          "MASTER_PORT": str(15000 + 2017)}


def test_a_requeued_job_listens_on_another_port_each_restart():
    """The run before a restart may leave its port in TIME_WAIT: each restart moves the port, every rank alike."""
    ports = [{rendezvous_from_env(srun_env(procid, nodeid, localid, SLURM_RESTART_COUNT=str(restart)))["MASTER_PORT"]
              for procid, nodeid, localid in [(0, 0, 0), (9, 4, 1)]} for restart in range(3)]
    assert all(len(same) == 1 for same in ports)
    assert [int(p) for (p,) in ports] == [15000 + 2017, 15000 + 2017 + 1009, 15000 + 2017 + 2018]
    wrapped = rendezvous_from_env(srun_env(0, 0, 0, SLURM_JOB_ID="9999", SLURM_RESTART_COUNT="1"))["MASTER_PORT"]
    assert wrapped == str(15000 + (9999 + 1009) % 10000)


def test_set_variables_win_over_derived_ones():
    rendezvous = rendezvous_from_env(srun_env(3, 1, 1, MASTER_ADDR="10.0.0.7", MASTER_PORT="23456"))
    assert (rendezvous["MASTER_ADDR"], rendezvous["MASTER_PORT"], rendezvous["RANK"]) == ("10.0.0.7", "23456", "3")


def test_master_port_is_deterministic_per_job():
    ports = {rendezvous_from_env(srun_env(r, r // 2, r % 2))["MASTER_PORT"] for r in range(10)}
    assert ports == {"17017"}
    assert rendezvous_from_env(srun_env(0, 0, 0, SLURM_JOB_ID="4242018"))["MASTER_PORT"] == "17018"


def test_batch_script_outside_srun_is_a_single_process():
    assert detect_launcher(BATCH_ENV) == "single"
    assert rendezvous_from_env(BATCH_ENV) == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_SIZE": "1",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": ANY_FREE_PORT}


def test_deepspeed_launcher_env_is_used_as_is_even_inside_srun():
    launcher_env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "MASTER_ADDR": "host-a",
                    "MASTER_PORT": "29511", "CROSS_RANK": "0", "CROSS_SIZE": "2"}
    assert detect_launcher({**SRUN_TASK_ENV, **launcher_env}) == "env"
    assert rendezvous_from_env({**SRUN_TASK_ENV, **launcher_env}) == launcher_env


def test_mpirun_ranks_come_from_open_mpi_and_the_master_from_discovery():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "PMIX_RANK": "1"}
    assert rendezvous_from_env(env) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
                                        "MASTER_PORT": str(DEFAULT_MASTER_PORT)}
    # mpirun inside an allocation starts its daemons with srun: the SLURM numbering is the daemons', not the ranks'.
    assert detect_launcher({**SRUN_TASK_ENV, **env}) == "mpi"
    assert rendezvous_from_env({**env, "MASTER_ADDR": "n1", "MASTER_PORT": "23000"})["MASTER_ADDR"] == "n1"


def test_srun_mpi_plugins_keep_slurm_numbering():
    pmi2 = {"PMI_FD": "11", "PMI_JOBID": "3.0", "PMI_RANK": "1", "PMI_SIZE": "2"}
    pmix = {"PMIX_RANK": "1", "PMIX_NAMESPACE": "slurm.pmix.2.0"}
    assert detect_launcher({**SRUN_TASK_ENV, **pmi2}) == "slurm"
    assert detect_launcher({**SRUN_TASK_ENV, **pmix}) == "slurm"
    # MPICH's mpiexec inside an allocation: 4 ranks through proxies started as a 2-task srun step.
    hydra = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    assert detect_launcher({**SRUN_TASK_ENV, **hydra}) == "mpi"
    assert rendezvous_from_env({**SRUN_TASK_ENV, **hydra})["RANK"] == "3"
    assert detect_launcher({"PMI_RANK": "0", "PMI_SIZE": "2"}) == "mpi"


def test_lone_process():
    assert detect_launcher({}) == "single"
    assert rendezvous_from_env({})["WORLD_SIZE"] == "1"


@pytest.mark.parametrize("drop, named", [
    ("SLURM_PROCID", "SLURM_PROCID"),
    ("SLURM_LOCALID", "SLURM_LOCALID"),
    ("SLURM_NODEID", "SLURM_NODEID"),
    (("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"), "SLURM_STEP_NUM_TASKS / SLURM_NTASKS"),
    (("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"), "SLURM_STEP_NODELIST"),
    (("SLURM_JOB_ID", "SLURM_JOBID"), "SLURM_JOB_ID"),
])
def test_inconsistent_srun_env_names_the_missing_variable(drop, named):
    dropped = {drop} if isinstance(drop, str) else set(drop)
    env = {k: v for k, v in srun_env(5, 2, 1).items() if k not in dropped}
    with pytest.raises(LaunchEnvironmentError, match=named):
        rendezvous_from_env(env)


@pytest.mark.parametrize("override, named", [
    ({"SLURM_PROCID": "x1"}, "SLURM_PROCID='x1' is not an integer"),
    ({"SLURM_PROCID": "10"}, "SLURM_PROCID=10 is outside 0..9"),
    ({"SLURM_NODEID": "5"}, "SLURM_NODEID=5 is outside 0..4"),
    ({"SLURM_STEP_NODELIST": "node[01-03"}, "SLURM_STEP_NODELIST: malformed"),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x4)"}, "SLURM_STEP_TASKS_PER_NODE='2\\(x4\\)' does not fit"),
    ({"SLURM_LOCALID": "2"}, "does not fit SLURM_NODEID=2, SLURM_LOCALID=2"),
])
def test_inconsistent_srun_env_names_the_bad_variable(override, named):
    with pytest.raises(LaunchEnvironmentError, match=named):
        rendezvous_from_env({**srun_env(5, 2, 1), **override})


def test_partial_launcher_env_names_what_is_missing():
    with pytest.raises(LaunchEnvironmentError, match="WORLD_SIZE set but LOCAL_RANK, MASTER_ADDR, MASTER_PORT not"):
        rendezvous_from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchEnvironmentError, match="WORLD_SIZE='two' is not an integer"):
        rendezvous_from_env({"RANK": "0", "WORLD_SIZE": "two", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
                             "MASTER_PORT": "1"})


def test_process_group_is_bound_to_the_rank_device_on_accelerators_only():
    """NCCL gets each rank's device up front (no guessing from the global rank); gloo on the CPU gets none."""
    import torch
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    assert bound_device(CUDA_Accelerator(), 3) == torch.device("cuda", 3)
    assert bound_device(CPU_Accelerator(), 0) is None


def test_resolvable_master_addr_is_kept():
    assert reachable_master_addr("localhost", {}) == "localhost"


def test_hostfile_lines():
    assert hostfile_lines(expand_nodelist("node[01-02],gpu5"), 8) == ["node01 slots=8", "node02 slots=8",
                                                                     "gpu5 slots=8"]
    with pytest.raises(ValueError, match="slots"):
        hostfile_lines(["a"], 0)


def test_hostfile_command_reads_the_allocation(subprocess_env):
    env = {**subprocess_env, "SLURM_JOB_NODELIST": "node[01-02],gpu5"}
    result = subprocess.run([sys.executable, "-m", "moelora_ds.distributed.hostfile", "--slots", "4"], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["node01 slots=4", "node02 slots=4", "gpu5 slots=4"]


def test_hostfile_command_outside_an_allocation(monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    assert main(["--slots", "2"]) == 2
    assert "SLURM_JOB_NODELIST is not set" in capsys.readouterr().err
    assert main(["--slots", "2", "--nodelist", "a[1-2]"]) == 0
    assert capsys.readouterr().out.splitlines() == ["a1 slots=2", "a2 slots=2"]


def test_train_sbatch_requeues_on_the_engines_exit_status():
    from moelora_ds.training.trainer import EXIT_CHECKPOINTED_ON_SIGNAL

    script = (REPO / "slurm" / "train.sbatch").read_text()
    assert f"\nEXIT_CHECKPOINTED_ON_SIGNAL={EXIT_CHECKPOINTED_ON_SIGNAL} " in script


def test_end_rank_process_keeps_the_exit_code_and_runs_atexit_handlers(tmp_path, subprocess_env):
    """It skips only the interpreter's finalization: atexit work (e.g. benchmarks/peak_memory.py's record) happens."""
    marker = tmp_path / "atexit-ran"
    script = ("import atexit, pathlib, sys\n"
              f"sys.path.insert(0, {str(REPO)!r})\n"
              "from moelora_ds.distributed.process_group import end_rank_process, say\n"
              f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
              "say('last line')\n"
              "end_rank_process(7)\n")
    result = subprocess.run([sys.executable, "-c", script], env=subprocess_env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 7, result.stderr
    assert result.stdout == "last line\n"
    assert marker.read_text() == "yes"


def test_mpirun_without_mpi4py_says_what_to_install(tmp_path, subprocess_env):
    """mpi4py is an optional extra: a rank started by mpirun that needs MPI discovery without it stops at once with
    what to install, before DeepSpeed tries (and fails deep inside) to import it."""
    env = dict(subprocess_env, OMPI_COMM_WORLD_SIZE="1", OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_LOCAL_RANK="0",
               OMPI_COMM_WORLD_LOCAL_SIZE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_STEP_ID"):
        env.pop(key, None)
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "from moelora_ds.distributed.process_group import init_distributed\n"
            "init_distributed()\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "LaunchEnvironmentError" in result.stderr and "pip install 'moelora-ds[mpi]'" in result.stderr, \
        result.stderr[-2000:]
