"""Jobs on a real two-node SLURM cluster (tests/slurm_cluster.py): rendezvous, hostfile, slurm/train.sbatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moelora_ds.launch import SLURM_PORT_BASE, expand_nodelist

from conftest import REPO

pytestmark = pytest.mark.slurm


def batch_script(path: Path, *lines: str) -> Path:
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + "\n".join(lines) + "\n")
    return path


def probe_reports(output: str) -> list[dict]:
    return sorted((json.loads(line.split("PROBE ", 1)[1]) for line in output.splitlines() if "PROBE " in line),
                  key=lambda report: report["rank"])


def run_job(cluster, script: Path, log: Path, env: dict, *options: str, timeout: float = 120) -> dict:
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
                          f"srun --ntasks-per-node=1 python {REPO / 'tests' / 'allreduce_probe.py'}")
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
                          f"srun --mpi=pmix --ntasks-per-node=1 python {REPO / 'tests' / 'allreduce_probe.py'}")
    record = run_job(slurm_cluster, script, tmp_path / "pmix.log", subprocess_env, "--nodes=2")
    assert [(r["rank"], r["sum"]) for r in probe_reports(record["log"])] == [(0, 3.0), (1, 3.0)]
    assert record["log"].count("via slurm") == 2


def test_hostfile_for_the_allocation(slurm_cluster, tmp_path, subprocess_env):
    script = batch_script(tmp_path / "hostfile.sbatch", "python -m moelora_ds.launch hostfile --slots 2")
    record = run_job(slurm_cluster, script, tmp_path / "hostfile.log", subprocess_env, "--nodes=2")
    assert record["log"].splitlines()[-2:] == ["node1 slots=2", "node2 slots=2"]
