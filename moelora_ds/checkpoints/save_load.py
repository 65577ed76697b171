"""Atomic, adapter-sized DeepSpeed checkpoints with the run's data position and RNG state.

The layout is locate.py's. A checkpoint is written
under `.tmp-<tag>`, renamed to `<tag>` once every rank has finished, and only then named in `latest`:
a crash or kill mid-save leaves `latest` on the previous good checkpoint, and `latest` never names a
missing one (not even while the checkpoint it names is saved again). Rotation (`prune`) keeps the newest
checkpoints of the run's current branch.
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

from moelora_ds.checkpoints.locate import LATEST, RUN_FILE, TMP_PREFIX, list_checkpoints, read_run_info, tag_for_step
from moelora_ds.checkpoints.safe_load import safe_load, vet_checkpoint_files


def rng_state(dropout: Optional[torch.Generator] = None) -> dict[str, Any]:
    """This rank's random state: the global streams and, when given, its dropout generator's."""
    from deepspeed.accelerator import get_accelerator

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "accelerator": get_accelerator().get_rng_state()}
    if dropout is not None:
        state["dropout"] = dropout.get_state()
    return state


def set_rng_state(state: dict[str, Any], dropout: Optional[torch.Generator] = None) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_accelerator().set_rng_state(state["accelerator"])
    if dropout is not None and "dropout" in state:
        dropout.set_state(state["dropout"])


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _latest_name(root: Path) -> Optional[str]:
    latest = root / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def _publish(root: Path, tag: str) -> None:
    """Rename the complete staging directory of `tag` to `tag` and name it in `latest`.

    `latest` names a complete checkpoint throughout: when it names `tag` itself (the same step saved again),
    it first names the staging directory, which `locate.latest_tag` follows to `tag` once renamed.
    """
    staging, replaced = f"{TMP_PREFIX}{tag}", root / f"{TMP_PREFIX}replaced-{tag}"
    if _latest_name(root) == tag:
        _write_atomically(root / LATEST, staging)
    shutil.rmtree(replaced, ignore_errors=True)
    if (root / tag).exists():
        os.replace(root / tag, replaced)  # gone from its name at once, never half deleted
    os.replace(root / staging, root / tag)
    _write_atomically(root / LATEST, tag)
    shutil.rmtree(replaced, ignore_errors=True)


def prune(root: Path, step: int, keep: int) -> list[str]:
    """Delete all checkpoints but the newest `keep` (0: keep all) of the run's current branch; returns the deleted.

    The current branch is the checkpoints of steps up to `step`, the one just published: a checkpoint of a
    higher step was written by a branch the run abandoned when it resumed from an older one (and would later
    be mistaken for the newest), so it is deleted, and never keeps the just-published one from being kept.
    """
    if keep == 0:
        return []
    tags = list_checkpoints(root)
    branch = [tag for tag in tags if read_run_info(root / tag).get("step", -1) <= step]
    kept = set(branch[-keep:]) | {_latest_name(root)}
    deleted = [tag for tag in tags if tag not in kept]
    for tag in deleted:
        shutil.rmtree(root / tag, ignore_errors=True)
    return deleted


def save_checkpoint(engine, root: Path, step: int, client_state: dict, run_info: dict, keep: int,
                    dropout: Optional[torch.Generator] = None) -> Path:
    """Save on every rank (with its random state and `dropout` generator's), publish on rank 0 (rename, then
    `latest`), prune to the newest `keep` of the run's branch (0: all).

    Refuses (NonFiniteError on every rank, nothing written) when any rank's adapters or optimizer state
    hold a NaN or an infinity.
    """
    from moelora_ds.training.nonfinite import check_finite_state

    check_finite_state(engine, engine.device, f"refusing to save checkpoint {tag_for_step(step)}")
    tag = tag_for_step(step)
    staging_tag = f"{TMP_PREFIX}{tag}"
    rank = dist.get_rank()
    if rank == 0:
        if _latest_name(root) == staging_tag:  # a save of this step stopped while publishing: finish it first
            _publish(root, tag)
        shutil.rmtree(root / staging_tag, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=staging_tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save(rng_state(dropout), root / staging_tag / f"rng_state_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        _write_atomically(root / staging_tag / RUN_FILE, json.dumps({**run_info, "step": step, "tag": tag}, indent=2))
        _publish(root, tag)
        prune(root, step, keep)
    dist.barrier()
    return root / tag


def load_checkpoint(engine, root: Path, tag: str, rng_dir: Optional[Path] = None,
                    dropout: Optional[torch.Generator] = None) -> dict:
    """Restore adapters, optimizer, scheduler (DeepSpeed) and this rank's random state (`dropout`'s too); return the
    client state.

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
        set_rng_state(safe_load(rng_file), dropout)
    return client_state
