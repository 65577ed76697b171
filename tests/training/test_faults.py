"""Faults during real 2-rank ZeRO-3 runs (dropout on): SIGTERM, a kill mid-save, a dead rank, a hung rank; and
determinism.

The uninterrupted reference is training_runs.tiny_run (shared with the SLURM and MPI tests).

"Mid-save" is hit without any hook in the code under test: the test polls the checkpoint directory
and freezes both ranks (SIGSTOP) the moment a `.tmp-<tag>` staging directory exists; frozen, the
state cannot move on, so the test can check that the save really is unfinished (staging directory
still there, tag not published) before it SIGKILLs them. If the save finished between seeing the
directory and freezing, the ranks are resumed (SIGCONT) and the next save is tried (one per step).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from moelora_ds.checkpoints.locate import LATEST, TMP_PREFIX

from harness import checkpoint_adapters, deepspeed_command
from training_runs import TRAIN_SCRIPT, WORLD_SIZE, catches, losses, rank_pids, tiny_run

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, tiny_mc_data, subprocess_env) -> tuple[Path, list[float]]:
    return tiny_run(tmp_path_factory, tiny_model_dir, tiny_mc_data, subprocess_env)


def start(config: Path, output_dir: Path, env: dict, *overrides: str) -> subprocess.Popen:
    """`launcher/train.py --config CONFIG --train.output_dir=OUTPUT_DIR [overrides]` on 2 ranks under DeepSpeed's
    launcher, which watches them (harness.deepspeed_command). Its output goes to OUTPUT_DIR.log (see `log`).
    """
    with open(output_dir.with_suffix(".log"), "w") as log_file:
        return subprocess.Popen(deepspeed_command(WORLD_SIZE, str(TRAIN_SCRIPT), "--config", str(config),
                                                  f"--train.output_dir={output_dir}", *overrides),
                                cwd=output_dir.parent, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True)


def log(output_dir: Path) -> str:
    return output_dir.with_suffix(".log").read_text()[-3000:]


def ranks(output_dir: Path) -> list[int]:
    """The rank processes (not the launcher's, whose command line names the script too), by local rank."""
    by_rank = {}
    for pid in rank_pids(output_dir):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except FileNotFoundError:
            continue
        local = [a.split("=", 1)[1] for a in argv if a.startswith("--local_rank=")]
        if local:
            by_rank[int(local[0])] = pid
    return [by_rank[r] for r in sorted(by_rank)]


def wait_for_ranks(process: subprocess.Popen, output_dir: Path, timeout: float = 120) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        pids = ranks(output_dir)
        if len(pids) == WORLD_SIZE:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"ranks did not start:\n{log(output_dir)}")


def wait_for_steps(process: subprocess.Popen, output_dir: Path, steps: int, timeout: float = 180) -> None:
    metrics = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"loss"') >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {steps}:\n{log(output_dir)}")


def send(pids: list[int], signum: int) -> None:
    for pid in pids:
        os.kill(pid, signum)


def freeze_mid_save(process: subprocess.Popen, root: Path, pids: list[int], timeout: float = 180) -> str:
    """Freeze the ranks while a save is staged but not yet published; returns the staged tag."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        staged = [name for name in (os.listdir(root) if root.is_dir() else []) if name.startswith(TMP_PREFIX)]
        if staged:
            send(pids, signal.SIGSTOP)
            tag = staged[0][len(TMP_PREFIX):]
            if (root / staged[0]).is_dir() and not (root / tag).exists():
                return tag
            send(pids, signal.SIGCONT)  # it was published meanwhile: catch the next one
    raise AssertionError(f"never caught a save in progress:\n{log(root.parent)}")


def test_kill_during_a_save_loses_nothing(reference, tmp_path, subprocess_env):
    config, uninterrupted = reference
    out = tmp_path / "run"
    process = start(config, out, subprocess_env, "--train.save_every=1", "--train.keep_checkpoints=0")
    pids = wait_for_ranks(process, out)
    root = out / "checkpoints"
    staged = freeze_mid_save(process, root, pids)
    published_before = (root / LATEST).read_text() if (root / LATEST).is_file() else None
    send(pids, signal.SIGKILL)
    assert process.wait(timeout=60) != 0
    staged_step = int(staged.split("_")[1])
    assert published_before == (f"step_{staged_step - 1}" if staged_step > 1 else None)
    assert (root / (TMP_PREFIX + staged)).is_dir() and not (root / staged).exists()
    if published_before is not None:
        checkpoint_adapters(out)  # the previous checkpoint is whole and readable

    resumed = start(config, out, subprocess_env, "--train.save_every=1", "--train.keep_checkpoints=0")
    assert resumed.wait(timeout=600) == 0, log(out)
    assert losses(out) == pytest.approx(uninterrupted, rel=1e-6, abs=1e-7)
    assert (root / LATEST).read_text() == f"step_{len(uninterrupted)}"
    assert not [name for name in os.listdir(root) if name.startswith(TMP_PREFIX)]


def test_sigterm_checkpoints_and_the_resumed_run_trains_as_if_uninterrupted(reference, tmp_path, subprocess_env):
    """SIGTERM (scancel, preemption, a node drain) reaches both ranks mid-run: they checkpoint at the next step
    boundary and exit with 75. The resumed run (checkpointing by wall clock alone, every step) ends with the
    uninterrupted run's losses."""
    config, uninterrupted = reference
    out = tmp_path / "run"
    process = start(config, out, subprocess_env)
    pids = wait_for_ranks(process, out)
    deadline = time.monotonic() + 120
    while not all(catches(pid, signal.SIGTERM) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    wait_for_steps(process, out, 1)
    send(pids, signal.SIGSTOP)  # a signal that reaches stopped ranks is handled when they go on: no race with the run
    logged = losses(out)
    assert len(logged) < len(uninterrupted) - 1, "the run had (nearly) finished before it could be signalled"
    send(pids, signal.SIGTERM)
    send(pids, signal.SIGCONT)
    assert process.wait(timeout=300) == 75, log(out)
    text = log(out)
    checkpointed = int(text.split("SIGTERM: checkpointed step ")[1].split(";")[0])
    assert len(logged) <= checkpointed < len(uninterrupted)
    assert (out / "checkpoints" / LATEST).read_text() == f"step_{checkpointed}"

    resumed = start(config, out, subprocess_env, "--train.save_every=0", "--train.save_every_minutes=1e-6",
                    "--train.keep_checkpoints=0")
    assert resumed.wait(timeout=600) == 0, log(out)
    assert f"resumed from {out / 'checkpoints' / f'step_{checkpointed}'}" in log(out)
    assert losses(out) == pytest.approx(uninterrupted, rel=1e-6, abs=1e-7)
    saved = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert saved == list(range(checkpointed, len(uninterrupted) + 1))  # by the clock after every step, and the end


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_lost_rank_ends_the_job(fault, reference, tmp_path, subprocess_env):
    """SIGKILL: the launcher sees its child die. SIGSTOP (a hung rank): the survivor's collective times out.

    The hung case takes about 5 s (the timeout) + 30 s: the deepspeed launcher gives the stopped rank
    30 s to answer SIGTERM before it SIGKILLs it; 90 s leaves room for a machine busy with other tests.
    """
    config, _ = reference
    out = tmp_path / "run"
    process = start(config, out, subprocess_env, "--train.max_steps=100000", "--train.collective_timeout_s=5")
    pids = wait_for_ranks(process, out)
    wait_for_steps(process, out, 2)
    victim = pids[1]
    started = time.monotonic()
    os.kill(victim, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    try:
        returncode = process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        send(ranks(out), signal.SIGKILL)
        process.kill()
        raise AssertionError(f"the job still ran 90 s after a rank was {fault}") from None
    elapsed = time.monotonic() - started
    assert returncode != 0 and elapsed < 90, log(out)
    deadline = time.monotonic() + 10
    while ranks(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not ranks(out), "ranks outlived the launcher"


def test_same_config_and_seed_give_identical_losses(reference, tmp_path, subprocess_env):
    config, first = reference
    out = tmp_path / "again"
    out.mkdir()
    process = start(config, out, subprocess_env)
    assert process.wait(timeout=600) == 0, log(out)
    assert losses(out) == first
