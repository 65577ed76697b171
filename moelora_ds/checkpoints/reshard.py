"""Resuming a checkpoint with a different number of ranks, through DeepSpeed's universal checkpoint format.

ZeRO stages 1-3 spread the fp32 master weights and the optimizer moments over the ranks that wrote
them. When a run resumes with another number of ranks, rank 0 converts the checkpoint once with
DeepSpeed's `ds_to_universal` (per-parameter fp32 weights and Adam moments, no partitioning) into a
scratch directory under the new run's checkpoints, every rank loads it with `checkpoint.load_universal`
set in the DeepSpeed config (adapters, optimizer moments, LR schedule, step), and the scratch directory
is removed. Nothing is lost: the continuation equals an uninterrupted run's up to summation order.
The global batch (micro_batch_size x grad_accum x ranks) must stay the same, so that the data position
(converted to the new ranks) and the schedule mean what they meant; otherwise the resume is refused
with a CheckpointError before the model is loaded. A stage-0 checkpoint holds whole weights and optimizer
state and loads with any number of ranks directly; only its data position is converted. A rank's random
state and dropout stream continue from the checkpoint's file of the same rank where it has one, else start
from the seed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from moelora_ds.checkpoints.locate import CheckpointError
from moelora_ds.checkpoints.safe_load import safe_load, vet_checkpoint_files

UNIVERSAL_SCRATCH = ".universal"
"""Directory under the run's checkpoints/ where a converted checkpoint lives while it is loaded."""


def saved_units_per_batch(info: dict) -> int:
    """Units (examples or packed rows) per data-position step of the run that wrote a checkpoint."""
    return int(info["config"]["train"]["micro_batch_size"]) * int(info["world_size"])


def needs_universal(info: dict, world_size: int, global_batch: int, checkpoint_dir: Path) -> bool:
    """Whether resuming `checkpoint_dir` (run info `info`) on `world_size` ranks goes through a universal checkpoint.

    Raises CheckpointError when the world size changes and the global batch (micro_batch_size x grad_accum
    x ranks) does not stay the same.
    """
    saved_world = int(info["world_size"])
    if saved_world == world_size:
        return False
    saved_train = info["config"]["train"]
    saved_batch = saved_train["micro_batch_size"] * saved_train["grad_accum"] * saved_world
    if global_batch != saved_batch:
        raise CheckpointError(f"resuming {checkpoint_dir} (global batch {saved_batch} on {saved_world} ranks) with "
                              f"{world_size} ranks needs the same global batch, but micro_batch_size x grad_accum x "
                              f"ranks = {global_batch}")
    return int(info.get("zero_stage", 0)) > 0


def convert_to_universal(checkpoint_dir: Path, scratch_root: Path) -> Path:
    """Convert a ZeRO checkpoint with DeepSpeed's ds_to_universal; returns the converted tag directory."""
    vet_checkpoint_files(checkpoint_dir)
    out = scratch_root / UNIVERSAL_SCRATCH / checkpoint_dir.name
    out.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                             str(checkpoint_dir), "--output_folder", str(out), "--num_extract_workers", "1",
                             "--num_merge_workers", "1"], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ds_to_universal could not convert {checkpoint_dir} for a resume on another number of "
                           f"ranks:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return out


def repair_universal_load(optimizer: torch.optim.Optimizer, universal_dir: Path) -> None:
    """Undo two slips of DeepSpeed 0.19.8's universal load, which would bend the first updates after the resume.

    It gives every parameter group one shared `step` tensor (so each optimizer step advances it once per
    group: Adam's bias correction goes wrong) and copies group 0's hyper-parameters (lr, name, ...) onto
    every group (the routers' router_lr is lost). Each group gets its own step and its saved settings back.
    `optimizer` is the torch optimizer inside DeepSpeed's wrapper.
    """
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    saved = safe_load(universal_dir / "zero" / "optimizer_state.pt")
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise RuntimeError(f"{universal_dir}: {len(saved_groups)} saved optimizer parameter groups, "
                           f"{len(optimizer.param_groups)} in this run")
    for group, saved_group in zip(optimizer.param_groups, saved_groups):
        group.update({key: value for key, value in saved_group.items() if key != "params"})


def convert_data_position(position: dict, saved_units: int, units: int) -> dict:
    """A data position counted in batches of `saved_units` units, counted in batches of `units` units."""
    consumed = int(position["batch_index"]) * saved_units
    if consumed % units:
        raise CheckpointError(f"the checkpoint's data position ({consumed} units into epoch {position['epoch']}) "
                              f"is not a whole number of this run's batches of {units} units")
    return {"epoch": int(position["epoch"]), "batch_index": consumed // units}
