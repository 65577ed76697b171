"""Shared fixtures: tiny models built from configs, a real BPE tokenizer trained offline, small data sets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from harness import (  # noqa: F401  (the builders the tests import from here)
    REPO,
    build_tiny_model,
    build_tokenizer,
    multiple_choice_records,
    save_tiny_model_dir,
    tiny_model_config,
    write_jsonl,
)


def pytest_configure(config):
    """Under `pytest -n N` (scripts/test.sh) each of the N test processes computes with its share of the cores: more
    threads than cores make OpenMP's threads spin on each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


MULTI_PROCESS_MARKS = ("distributed", "slurm", "mpi")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """For `pytest -n N --dist loadgroup`: a test file is one group (its module fixtures exist once), the files that
    share the SLURM cluster one group (one cluster), the groups with the most multi-process tests first (each worker
    takes the next group when it is free: the long ones first leave short ones to even out the end)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    group = {item.nodeid: "slurm-cluster" if "slurm_cluster" in getattr(item, "fixturenames", ())
             else item.nodeid.split("::")[0] for item in items}
    weight: dict[str, int] = {}
    for item in items:
        heavy = any(item.get_closest_marker(mark) for mark in MULTI_PROCESS_MARKS)
        weight[group[item.nodeid]] = weight.get(group[item.nodeid], 0) + heavy
    items.sort(key=lambda item: -weight[group[item.nodeid]])
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group[item.nodeid]))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama with its tokenizer saved as a Hugging Face directory, as a user's local model would be."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_mc_data(tmp_path_factory) -> dict[str, Path]:
    """train.jsonl (64 records) and test.jsonl (16 records) of multiple-choice chat data."""
    path = tmp_path_factory.mktemp("mc-data")
    return {"train": write_jsonl(path / "train.jsonl", multiple_choice_records(64, seed=0)),
            "test": write_jsonl(path / "test.jsonl", multiple_choice_records(16, seed=1))}


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for launched ranks: the repo importable, offline, quiet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private two-node SLURM cluster (node1, node2) on this machine; see tests/slurm_cluster.py."""
    from slurm_cluster import SlurmCluster

    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
