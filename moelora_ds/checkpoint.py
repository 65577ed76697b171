"""Atomic, adapter-sized DeepSpeed checkpoints with the run's data position and RNG state.

Layout: `output_dir/checkpoints/<tag>/` (DeepSpeed's files, `moelora_run.json`, one `rng_state_rank<R>.pt`
per rank) and `output_dir/checkpoints/latest` naming the newest complete tag. A checkpoint is written
under `.tmp-<tag>`, renamed to `<tag>` once every rank has finished, and only then named in `latest`:
a crash or kill mid-save leaves `latest` on the previous good checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from .config import ConfigError

CHECKPOINTS = "checkpoints"  # OUTPUT_DIR/checkpoints/<tag>/
RUN_FILE = "moelora_run.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"


def tag_for_step(step: int) -> str:
    return f"step_{step}"


def rng_state() -> dict[str, Any]:
    from deepspeed.accelerator import get_accelerator

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "accelerator": get_accelerator().get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_accelerator().set_rng_state(state["accelerator"])


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(engine, root: Path, step: int, client_state: dict, run_info: dict, keep: int) -> Path:
    """Save on every rank, publish on rank 0 (rename, then `latest`), prune to the newest `keep` (0: all).

    Refuses (NonFiniteError on every rank, nothing written) when any rank's adapters or optimizer state
    hold a NaN or an infinity.
    """
    from .nonfinite import check_finite_state

    check_finite_state(engine, engine.device, f"refusing to save checkpoint {tag_for_step(step)}")
    tag = tag_for_step(step)
    staging_tag = f"{TMP_PREFIX}{tag}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(root / staging_tag, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=staging_tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save(rng_state(), root / staging_tag / f"rng_state_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        _write_atomically(root / staging_tag / RUN_FILE, json.dumps({**run_info, "step": step, "tag": tag}, indent=2))
        shutil.rmtree(root / tag, ignore_errors=True)
        os.replace(root / staging_tag, root / tag)
        _write_atomically(root / LATEST, tag)
        if keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return root / tag


def list_checkpoints(root: Path) -> list[str]:
    """Complete checkpoint tags under `root`, oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and (p / RUN_FILE).is_file()
            and not p.name.startswith(TMP_PREFIX)]
    return sorted(tags, key=lambda t: json.loads((root / t / RUN_FILE).read_text())["step"])


def resolve_resume(root: Path, resume: str, source: str) -> Optional[tuple[Path, str]]:
    """(checkpoint root, tag) to resume from, or None to start fresh. `resume`: auto | never | a tag directory.

    A `resume` that names no complete checkpoint is a ConfigError prefixed with `source` (the config file)."""
    if resume == "never":
        return None
    if resume == "auto":
        latest = root / LATEST
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not (root / tag / RUN_FILE).is_file():
            raise ConfigError(f"{source}: train.resume: auto, but {latest} names checkpoint {tag!r} and "
                              f"{root / tag / RUN_FILE} is missing (incomplete or moved); complete checkpoints: "
                              f"{list_checkpoints(root) or 'none'}. Resume from one with --train.resume=DIR, or "
                              f"start over in a new train.output_dir")
        return root, tag
    path = Path(resume)
    if not (path / RUN_FILE).is_file():
        raise ConfigError(f"{source}: train.resume: {path} is not a moelora-ds checkpoint directory (no {RUN_FILE}); "
                          f"expected auto, never or a directory like OUTPUT_DIR/checkpoints/step_100")
    return path.parent, path.name


def read_run_info(checkpoint_dir: Path) -> dict:
    return json.loads((checkpoint_dir / RUN_FILE).read_text())


def load_checkpoint(engine, root: Path, tag: str, rng_dir: Optional[Path] = None) -> dict:
    """Restore adapters, optimizer, scheduler (DeepSpeed) and this rank's RNG; return the client state.

    Under ZeRO stages 1-3 the world size must be the one that saved, or `root/tag` a universal checkpoint
    (reshard.py); `rng_dir` is where the per-rank RNG files are (default: root/tag).
    """
    path, client_state = engine.load_checkpoint(str(root), tag=tag, load_module_strict=False,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    rng_file = (rng_dir or root / tag) / f"rng_state_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
