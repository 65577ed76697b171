"""One tiny two-rank training run, shared by the SLURM and MPI tests, and its reference under the deepspeed launcher."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import yaml

from moelora_ds.telemetry.metrics import read_metrics

from conftest import REPO
from harness import deepspeed_command

STEPS = 8
WORLD_SIZE = 2
TRAIN_SCRIPT = REPO / "launcher" / "train.py"
_reference_losses: dict[Path, list[float]] = {}


def write_tiny_config(path: Path, model_dir: Path, data: dict[str, Path]) -> Path:
    """A tiny ZeRO-3 fp32 run with dropout (so resuming must restore the RNG too); output_dir is set per run."""
    config = {
        "model": {"name_or_path": str(model_dir), "gguf_file": None, "dtype": "float32"},
        "moelora": {"num_experts": 4, "rank": 4, "alpha": 8, "top_k": 2, "dropout": 0.1},
        "optimizer": {"name": "riemannian_adamw", "lr": 1e-2, "reg": 1e-3},
        "scheduler": {"name": "linear", "warmup_steps": 2},
        "data": {"train_path": str(data["train"]), "eval_path": None, "max_length": 64},
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "seed": 7, "log_every": 1, "plots": False},
        "deepspeed": "ds_configs/zero3.json",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def losses(output_dir: Path) -> list[float]:
    """Training losses of steps 1..n from output_dir/metrics.jsonl, checking that every step was logged once."""
    records = [r for r in read_metrics(output_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)), records
    return [r["loss"] for r in records]


def tiny_run(tmp_path_factory, model_dir: Path, data: dict[str, Path], env: dict[str, str]) -> tuple[Path, list[float]]:
    """The session's tiny config and the losses of `deepspeed --num_gpus 2 launcher/train.py --config CONFIG`.

    The reference run happens once per test session, whichever test module asks first.
    """
    root = tmp_path_factory.getbasetemp() / "tiny-run"
    config = root / "config.yaml"
    if config not in _reference_losses:
        root.mkdir(exist_ok=True)
        write_tiny_config(config, model_dir, data)
        output_dir = root / "deepspeed"
        shutil.rmtree(output_dir, ignore_errors=True)
        result = subprocess.run(deepspeed_command(WORLD_SIZE, str(TRAIN_SCRIPT), "--config", str(config),
                                                  f"--train.output_dir={output_dir}"),
                                cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"reference run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        _reference_losses[config] = losses(output_dir)
        assert len(_reference_losses[config]) == STEPS
    return config, _reference_losses[config]


def rank_pids(output_dir: Path) -> list[int]:
    """Python processes on this machine running launcher/train.py with `--train.output_dir=OUTPUT_DIR`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
            continue
        if Path(argv[0]).name.startswith("python") and str(TRAIN_SCRIPT) in argv \
                and f"--train.output_dir={output_dir}" in argv:
            pids.append(int(proc.name))
    return pids


def _signal_mask(pid: int, *fields: str) -> int:
    """The OR of signal masks `fields` (SigCgt, SigPnd, ShdPnd, ...) of /proc/PID/status; 0 once the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    mask = 0
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            mask |= int(value.strip(), 16)
    return mask


def catches(pid: int, signum: int = signal.SIGUSR1) -> bool:
    """Whether process `pid` has a handler installed for `signum`."""
    return bool(_signal_mask(pid, "SigCgt") >> (signum - 1) & 1)


def pending(pid: int, signum: int = signal.SIGUSR1) -> bool:
    """Whether `signum` was delivered to (stopped) process `pid` and waits to be handled."""
    return bool(_signal_mask(pid, "SigPnd", "ShdPnd") >> (signum - 1) & 1)
