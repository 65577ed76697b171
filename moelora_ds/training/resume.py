"""Resuming a run: which checkpoint it continues (if any), whether its configuration may continue that one, and
loading it into the engine (directly, or through a universal conversion for another number of ranks)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from moelora_ds.checkpoints.compatibility import check_resume_compatible
from moelora_ds.checkpoints.locate import read_run_info
from moelora_ds.checkpoints.reshard import UNIVERSAL_SCRATCH, convert_to_universal, repair_universal_load
from moelora_ds.checkpoints.save_load import load_checkpoint
from moelora_ds.config import RunConfig
from moelora_ds.distributed.process_group import all_sum
from moelora_ds.training.optimizers import configured_hyperparameters, reapply_hyperparameters
from moelora_ds.training.preflight import resume_needs_universal, resume_point


@dataclass
class ResumePoint:
    """The checkpoint a run continues: `root/tag`, and whether it loads through a universal conversion."""
    root: Path
    tag: str
    universal: bool

    @property
    def directory(self) -> Path:
        return self.root / self.tag


def find_resume_point(config: RunConfig, world_size: int, data_fingerprint: str,
                      announce: bool) -> Optional[ResumePoint]:
    """train.resume's checkpoint, or None to start fresh; a ConfigError when the configuration makes it another
    experiment (checkpoints/compatibility.py). With `announce`, prints the settings that changed."""
    found = resume_point(config)
    if found is None:
        return None
    root, tag = found
    universal = resume_needs_universal(config, root / tag, world_size)
    changes = check_resume_compatible(config, read_run_info(root / tag), world_size, data_fingerprint, root / tag)
    if changes and announce:
        print(f"[moelora-ds] resuming {root / tag} with changed settings (the new values take effect): "
              f"{'; '.join(changes)}", flush=True)
    return ResumePoint(root, tag, universal)


def restore(engine, scheduler, point: ResumePoint, scratch_root: Path, dropout: torch.Generator,
            device: torch.device) -> dict:
    """Load `point` into the engine (adapters, optimizer, schedule, this rank's random state and `dropout` stream) and
    return its client state; the configured optimizer hyperparameters and peak learning rates apply from here on."""
    configured = configured_hyperparameters(scheduler.optimizer)
    if point.universal:
        client_state = _load_universal(engine, point.directory, scratch_root, dropout, device)
    else:
        client_state = load_checkpoint(engine, point.root, point.tag, dropout=dropout)
    reapply_hyperparameters(scheduler, configured)
    return client_state


def _load_universal(engine, checkpoint_dir: Path, scratch_root: Path, dropout: torch.Generator,
                    device: torch.device) -> dict:
    """Load a checkpoint written by another number of ranks via a universal conversion (reshard.py)."""
    rank, failure = dist.get_rank(), ""
    if rank == 0:
        print(f"[moelora-ds] {checkpoint_dir} was written by {read_run_info(checkpoint_dir)['world_size']} "
              f"ranks: converting it to a universal checkpoint for {dist.get_world_size()}", flush=True)
        try:
            convert_to_universal(checkpoint_dir, scratch_root)
        except (OSError, RuntimeError) as error:
            failure = str(error)
    if all_sum([float(bool(failure))], device)[0]:
        raise RuntimeError(failure or "rank 0 could not convert the checkpoint to a universal one")
    scratch = scratch_root / UNIVERSAL_SCRATCH
    client_state = load_checkpoint(engine, scratch, checkpoint_dir.name, rng_dir=checkpoint_dir, dropout=dropout)
    repair_universal_load(getattr(engine.optimizer, "optimizer", engine.optimizer), scratch / checkpoint_dir.name)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
    return client_state
