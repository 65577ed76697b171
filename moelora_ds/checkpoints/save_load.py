"""Atomic, adapter-sized DeepSpeed checkpoints with the run's data position and RNG state.

The layout is locate.py's. A checkpoint is written
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

from moelora_ds.checkpoints.locate import LATEST, RUN_FILE, TMP_PREFIX, list_checkpoints, tag_for_step
from moelora_ds.checkpoints.safe_load import safe_load, vet_checkpoint_files


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
    from moelora_ds.training.nonfinite import check_finite_state

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


def load_checkpoint(engine, root: Path, tag: str, rng_dir: Optional[Path] = None) -> dict:
    """Restore adapters, optimizer, scheduler (DeepSpeed) and this rank's RNG; return the client state.

    Under ZeRO stages 1-3 the world size must be the one that saved, or `root/tag` a universal checkpoint
    (reshard.py); `rng_dir` is where the per-rank RNG files are (default: root/tag).
    """
    vet_checkpoint_files(root / tag)
    path, client_state = engine.load_checkpoint(str(root), tag=tag, load_module_strict=False,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    rng_file = (rng_dir or root / tag) / f"rng_state_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(safe_load(rng_file))
    return client_state
