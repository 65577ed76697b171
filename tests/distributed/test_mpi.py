"""Ranks started by OpenMPI's mpirun: DeepSpeed's MPI discovery (mpi4py) through moelora_ds.distributed."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from allreduce_probe import SCRIPT as PROBE
from allreduce_probe import probe_reports

from moelora_ds.checkpoints.locate import read_run_info

import training_runs
from conftest import REPO
from slurm_cluster import free_ports

pytestmark = pytest.mark.mpi


def mpirun(ranks: int, *command: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`mpirun -np N` as root on this one machine; MASTER_PORT is a free port so concurrent runs do not collide."""
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun not found: install Debian's openmpi-bin and libopenmpi-dev (then pip install mpi4py)")
    (port,) = free_ports(1)
    return subprocess.run(["mpirun", "-np", str(ranks), "--allow-run-as-root", "--oversubscribe",
                           "-x", f"MASTER_PORT={port}", *command], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_mpirun_allreduce(subprocess_env):
    result = mpirun(2, "python", str(PROBE), env=subprocess_env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = probe_reports(result.stdout)
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == 2 and r["sum"] == 3.0 and r["backend"] == "gloo" for r in reports)
    assert [r["env"]["LOCAL_RANK"] for r in reports] == ["0", "1"]
    assert "via mpi, master via MPI" in result.stdout


def test_training_under_mpirun_matches_the_deepspeed_launcher(tmp_path_factory, tiny_model_dir, tiny_mc_data, tmp_path,
                                                              subprocess_env):
    config, reference = training_runs.tiny_run(tmp_path_factory, tiny_model_dir, tiny_mc_data, subprocess_env)
    output_dir = tmp_path / "out"
    result = mpirun(training_runs.WORLD_SIZE, "python", str(training_runs.TRAIN_SCRIPT), "--config", str(config),
                    f"--train.output_dir={output_dir}", env=subprocess_env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("via mpi, master via MPI") == training_runs.WORLD_SIZE
    root = output_dir / "checkpoints"
    assert read_run_info(root / (root / "latest").read_text().strip())["world_size"] == training_runs.WORLD_SIZE
    assert training_runs.losses(output_dir) == pytest.approx(reference, rel=1e-6, abs=1e-7)


@pytest.mark.slurm
def test_mpirun_inside_a_two_node_allocation(slurm_cluster, tmp_path, subprocess_env):
    """OpenMPI starts its daemon on node2 through srun: that rank sees SLURM step variables as well as MPI ones."""
    (port,) = free_ports(1)
    script = tmp_path / "mpirun.sbatch"
    script.write_text("#!/bin/bash\n"
                      f"mpirun --allow-run-as-root -np 2 --map-by node -x MASTER_PORT={port} -x OMPI_MCA_btl=self,tcp "
                      f"python {PROBE}\n")
    log = tmp_path / "mpirun.log"
    job_id = slurm_cluster.submit(script, env=subprocess_env, options=["--nodes=2", "--output", str(log)])
    record = slurm_cluster.wait(job_id, timeout=300)
    assert record["JobState"] == "COMPLETED", log.read_text()[-4000:]
    reports = probe_reports(log.read_text())
    assert [(r["rank"], r["node"], r["sum"]) for r in reports] == [(0, "node1", 3.0), (1, "node2", 3.0)]
    assert log.read_text().count("via mpi, master via MPI") == 2
