"""Resuming a checkpoint with a different number of ranks.

ZeRO stages 1-3 spread the fp32 master weights and the optimizer moments over the ranks that wrote
them, and DeepSpeed does not re-shard them into another world size. With `train.resume_reshard=true`
a run resumes anyway, exactly where the data and the schedule were, with:
- the adapters exactly as saved: their fp32 weights are reassembled from all partitions
  (checkpoint_adapters.read_trained_adapters, any stage and world size) and copied into the model
  *before* `deepspeed.initialize`, so DeepSpeed builds its new partitions and fp32 masters from them;
- the learning-rate schedule, step and data position of the checkpoint (the data position converted
  to the new ranks; the global batch, micro_batch_size x grad_accum x ranks, must stay the same);
- fresh optimizer state: Adam's moments (SGD's momentum) restart from zero, which a loud warning says.
Without the key such a resume is refused with a ConfigError that names the way out. A stage-0
checkpoint holds whole weights and optimizer state and resumes with any number of ranks as it is;
only its data position is converted.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint_adapters import read_trained_adapters
from .config import ConfigError, RunConfig
from .inject import adapter_parameters


def saved_units_per_batch(info: dict) -> int:
    """Units (examples or packed rows) per data-position step of the run that wrote a checkpoint."""
    return int(info["config"]["train"]["micro_batch_size"]) * int(info["world_size"])


def needs_reshard(info: dict, config: RunConfig, world_size: int, checkpoint_dir: Path) -> bool:
    """Whether resuming `checkpoint_dir` (run info `info`) with `world_size` ranks must re-shard; refuse if not allowed."""
    saved_world, stage = int(info["world_size"]), int(info.get("zero_stage", 0))
    if saved_world == world_size:
        return False
    saved_train = info["config"]["train"]
    saved_batch = saved_train["micro_batch_size"] * saved_train["grad_accum"] * saved_world
    batch = config.train.micro_batch_size * config.train.grad_accum * world_size
    if batch != saved_batch:
        raise ConfigError(f"{config.source}: train: resuming {checkpoint_dir} (global batch {saved_batch} on "
                          f"{saved_world} ranks) with {world_size} ranks needs the same global batch, but "
                          f"micro_batch_size x grad_accum x ranks = {batch}; adjust train.grad_accum")
    if stage == 0:
        return False
    if not config.train.resume_reshard:
        raise ConfigError(f"{config.source}: train.resume_reshard: {checkpoint_dir} was written by {saved_world} "
                          f"ranks under ZeRO stage {stage} and is resumed with {world_size}: ZeRO optimizer "
                          f"partitions do not re-shard. Resume with {saved_world} ranks, or set "
                          f"train.resume_reshard=true to keep the adapters exactly and restart the optimizer "
                          f"state (Adam moments) from zero")
    return True


def load_adapters(model: nn.Module, checkpoint_dir: Path) -> None:
    """Copy a checkpoint's fp32 adapters into an injected model that DeepSpeed has not initialised yet."""
    saved = read_trained_adapters(checkpoint_dir).adapters
    params = adapter_parameters(model)
    if set(saved) != set(params):
        raise ConfigError(f"{checkpoint_dir}: its adapters do not fit this run's model and moelora section "
                          f"(missing {sorted(set(params) - set(saved))[:3]}, unexpected "
                          f"{sorted(set(saved) - set(params))[:3]})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name].to(param.dtype))


def saved_client_state(checkpoint_dir: Path) -> dict:
    """The step, data position and LR-scheduler state DeepSpeed stored in the checkpoint's rank-0 model file."""
    files = sorted(checkpoint_dir.glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir}: no DeepSpeed model-state file (*mp_rank_00_model_states.pt)")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    return {"step": state["step"], "data": state["data"], "lr_scheduler": state["lr_scheduler"]}


def convert_data_position(position: dict, saved_units: int, units: int) -> dict:
    """A data position counted in batches of `saved_units` units, counted in batches of `units` units."""
    consumed = int(position["batch_index"]) * saved_units
    if consumed % units:
        raise ConfigError(f"the checkpoint's data position ({consumed} units into epoch {position['epoch']}) "
                          f"is not a whole number of this run's batches of {units} units")
    return {"epoch": int(position["epoch"]), "batch_index": consumed // units}
