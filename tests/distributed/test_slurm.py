"""Jobs on a real two-node SLURM cluster (tests/slurm_cluster.py): rendezvous, hostfile, slurm/train.sbatch."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from allreduce_probe import SCRIPT as PROBE
from allreduce_probe import probe_reports

from moelora_ds.checkpoints.locate import read_run_info
from moelora_ds.distributed.rendezvous import SLURM_PORT_BASE
from moelora_ds.distributed.slurm_nodelist import expand_nodelist
from moelora_ds.telemetry.metrics import read_metrics

import training_runs
from conftest import REPO

pytestmark = pytest.mark.slurm


def batch_script(path: Path, *lines: str) -> Path:
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + "\n".join(lines) + "\n")
    return path


def run_job(cluster, script: Path, log: Path, env: dict, *options: str, timeout: float = 300) -> dict:
    job_id = cluster.submit(script, env=env, options=["--output", str(log), *options], cwd=REPO)
    record = cluster.wait(job_id, timeout)
    record["log"] = log.read_text() if log.exists() else ""
    assert record["JobState"] == "COMPLETED", f"job {job_id}: {record}\n{record['log'][-4000:]}"
    return record


@pytest.mark.parametrize("nodelist", ["node[01-03,07],gpu5", "rack[1-2]-n[08-10]", "a1,b[2],c-x[0-1]"])
def test_nodelist_expansion_matches_scontrol(slurm_cluster, nodelist):
    assert expand_nodelist(nodelist) == slurm_cluster.command("scontrol", "show", "hostnames", nodelist).split()


def test_srun_ranks_rendezvous_across_two_nodes(slurm_cluster, tmp_path, subprocess_env):
    script = batch_script(tmp_path / "probe.sbatch",
                          f"srun --ntasks-per-node=1 python {PROBE}")
    record = run_job(slurm_cluster, script, tmp_path / "probe.log", subprocess_env, "--nodes=2")
    reports = probe_reports(record["log"])
    assert [(r["rank"], r["node"]) for r in reports] == [(0, "node1"), (1, "node2")]
    assert all(r["world_size"] == 2 and r["sum"] == 3.0 and r["backend"] == "gloo" for r in reports)
    job_id = int(record["JobId"])
    assert {r["env"]["MASTER_PORT"] for r in reports} == {str(SLURM_PORT_BASE + job_id % 10000)}
    # node1 is no DNS name here: its NodeAddr from scontrol is the master address.
    assert {r["env"]["MASTER_ADDR"] for r in reports} == {"127.0.0.1"}


def test_srun_with_pmix_keeps_slurm_rendezvous(slurm_cluster, tmp_path, subprocess_env):
    script = batch_script(tmp_path / "pmix.sbatch",
                          f"srun --mpi=pmix --ntasks-per-node=1 python {PROBE}")
    record = run_job(slurm_cluster, script, tmp_path / "pmix.log", subprocess_env, "--nodes=2")
    assert [(r["rank"], r["sum"]) for r in probe_reports(record["log"])] == [(0, 3.0), (1, 3.0)]
    assert record["log"].count("via slurm") == 2


def test_hostfile_for_the_allocation(slurm_cluster, tmp_path, subprocess_env):
    script = batch_script(tmp_path / "hostfile.sbatch", "python -m moelora_ds.distributed.hostfile --slots 2")
    record = run_job(slurm_cluster, script, tmp_path / "hostfile.log", subprocess_env, "--nodes=2")
    assert record["log"].splitlines()[-2:] == ["node1 slots=2", "node2 slots=2"]


TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"
EXPORT_SBATCH = REPO / "slurm" / "export.sbatch"
# The test nodes have 2 CPUs and no GPUs: override the script's GPU defaults, one CPU rank per node.
CPU_OPTIONS = ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir, tiny_mc_data, subprocess_env):
    return training_runs.tiny_run(tmp_path_factory, tiny_model_dir, tiny_mc_data, subprocess_env)


def submit_training(cluster, config: Path, output_dir: Path, log: Path, env: dict) -> int:
    """`MOELORA_CPU=1 sbatch [CPU options] slurm/train.sbatch CONFIG --train.output_dir=...` from the repository."""
    return cluster.submit(TRAIN_SBATCH, [str(config), f"--train.output_dir={output_dir}"],
                          env={**env, "MOELORA_CPU": "1"}, options=[*CPU_OPTIONS, "--output", str(log)], cwd=REPO)


def pause_ranks(cluster, output_dir: Path, max_logged_steps: int) -> list[int]:
    """SIGSTOP both training ranks as soon as both handle SIGUSR1; returns their pids.

    A signal that reached stopped ranks is handled as soon as they continue, so what the test signals
    does not race the tiny run (several steps per second). Fails if the run had logged more than
    `max_logged_steps` steps.
    """
    def handlers_installed() -> bool:
        pids = training_runs.rank_pids(output_dir)
        return len(pids) == training_runs.WORLD_SIZE and all(map(training_runs.catches, pids))

    cluster.wait_for(handlers_installed, timeout=300, what=f"two training ranks handling SIGUSR1 ({output_dir})",
                     poll=0.05)
    pids = training_runs.rank_pids(output_dir)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    logged = len(read_metrics(output_dir))
    assert logged <= max_logged_steps, f"the run had logged {logged} steps before it could be paused"
    return pids


def resume_ranks(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGCONT)


def test_train_sbatch_on_two_nodes_matches_the_deepspeed_launcher_then_exports(slurm_cluster, tiny_run, tmp_path,
                                                                              subprocess_env):
    config, reference = tiny_run
    output_dir, log = tmp_path / "out", tmp_path / "train.log"
    record = slurm_cluster.wait(submit_training(slurm_cluster, config, output_dir, log, subprocess_env), timeout=300)
    text = log.read_text()
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "0"), text[-4000:]
    assert "rank 0/2 (local 0) on node1 via slurm" in text and "rank 1/2 (local 0) on node2 via slurm" in text
    root = output_dir / "checkpoints"
    info = read_run_info(root / (root / "latest").read_text().strip())
    assert (info["world_size"], info["step"]) == (2, training_runs.STEPS)
    assert training_runs.losses(output_dir) == pytest.approx(reference, rel=1e-6, abs=1e-7)

    export_dir, export_log = tmp_path / "merged", tmp_path / "export.log"
    export_job = slurm_cluster.submit(EXPORT_SBATCH, [str(output_dir), str(export_dir)], env=subprocess_env,
                                      options=["--cpus-per-task=1", "--output", str(export_log)], cwd=REPO)
    record = slurm_cluster.wait(export_job, timeout=300)
    assert (record["JobState"], record["NumNodes"]) == ("COMPLETED", "1"), export_log.read_text()[-4000:]
    assert (export_dir / "config.json").is_file() and (export_dir / "model.safetensors").is_file()


def test_train_sbatch_with_two_cpu_ranks_per_node(slurm_cluster, tiny_run, tmp_path, subprocess_env):
    config, _ = tiny_run
    output_dir, log = tmp_path / "out", tmp_path / "train.log"
    args = [str(config), f"--train.output_dir={output_dir}", "--train.max_steps=2"]
    job_id = slurm_cluster.submit(TRAIN_SBATCH, args,
                                  env={**subprocess_env, "MOELORA_CPU": "1", "MOELORA_TASKS_PER_NODE": "2"},
                                  options=["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                                           "--output", str(log)], cwd=REPO)
    record = slurm_cluster.wait(job_id, timeout=300)
    text = log.read_text()
    assert record["JobState"] == "COMPLETED", text[-4000:]
    placed = set(re.findall(r"rank (\d)/4 \(local (\d)\) on (node\d) via slurm", text))
    assert placed == {("0", "0", "node1"), ("1", "1", "node1"), ("2", "0", "node2"), ("3", "1", "node2")}
    assert read_run_info(output_dir / "checkpoints" / "step_2")["world_size"] == 4
    assert len(training_runs.losses(output_dir)) == 2


def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, tiny_run, tmp_path, subprocess_env):
    config, reference = tiny_run
    output_dir, log = tmp_path / "out", tmp_path / "train.log"
    job_id = submit_training(slurm_cluster, config, output_dir, log, subprocess_env)
    # The flag is all-reduced after every step: stopped with at most STEPS - 3 steps logged, the ranks checkpoint
    # at step STEPS - 1 at the latest, so the requeued run has steps left to train.
    ranks = pause_ranks(slurm_cluster, output_dir, max_logged_steps=training_runs.STEPS - 3)
    slurm_cluster.command("scancel", "--signal=USR1", str(job_id))
    slurm_cluster.wait_for(lambda: all(map(training_runs.pending, ranks)), timeout=30, what="SIGUSR1 at both ranks")
    resume_ranks(ranks)
    record = slurm_cluster.wait(job_id, timeout=300)
    text = log.read_text()
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-4000:]
    checkpointed = [int(m) for m in re.findall(r"SIGUSR1: checkpointed step (\d+)", text)]
    assert len(checkpointed) == 1 and 1 <= checkpointed[0] < training_runs.STEPS, text[-4000:]
    assert f"requeueing job {job_id}" in text
    assert f"resumed from {output_dir / 'checkpoints' / f'step_{checkpointed[0]}'}" in text
    assert read_run_info(output_dir / "checkpoints" / f"step_{training_runs.STEPS}")["world_size"] == 2
    assert training_runs.losses(output_dir) == pytest.approx(reference, rel=1e-6, abs=1e-7)


def test_cancelled_job_is_not_requeued(slurm_cluster, tiny_run, tmp_path, subprocess_env):
    config, _ = tiny_run
    output_dir, log = tmp_path / "out", tmp_path / "train.log"
    job_id = submit_training(slurm_cluster, config, output_dir, log, subprocess_env)
    pause_ranks(slurm_cluster, output_dir, max_logged_steps=training_runs.STEPS - 1)
    slurm_cluster.command("scancel", str(job_id))  # SLURM itself continues, then terminates the stopped ranks
    record = slurm_cluster.wait(job_id, timeout=60)
    assert (record["JobState"], record["Restarts"]) == ("CANCELLED", "0")
    assert "requeueing" not in log.read_text()


@pytest.mark.parametrize("env, args, message", [
    ({"MOELORA_CPU": "1"}, [], "usage: sbatch slurm/train.sbatch CONFIG"),
    ({}, ["config.yaml"], "no GPUs allocated (--gpus-per-node); for CPU training set MOELORA_CPU=1"),
])
def test_train_sbatch_refuses_bad_invocations(slurm_cluster, tmp_path, subprocess_env, env, args, message):
    log = tmp_path / "train.log"
    job_id = slurm_cluster.submit(TRAIN_SBATCH, args, env={**subprocess_env, **env},
                                  options=[*CPU_OPTIONS, "--output", str(log)], cwd=REPO)
    record = slurm_cluster.wait(job_id, timeout=60)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("FAILED", "2:0", "0")
    assert message in log.read_text()
