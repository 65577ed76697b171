"""Reading the trained adapters back out of a training checkpoint of any ZeRO stage and world size.

Checkpoints are saved with `exclude_frozen_parameters=True`, so they hold the adapters only. Under ZeRO
stages 1-3 the fp32 master weights are spread over the ranks' `*_optim_states.pt` files and
`deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` reassembles them (any world
size). Under stage 0 DeepSpeed writes one `mp_rank_00_model_states.pt` whose `module` dict holds the
adapters in the training dtype (measured with DeepSpeed 0.19.8: fp32, or the bf16 working copy in a bf16 run).
"""

from __future__ import annotations

import contextlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.inject import find_target_linears
from moelora_ds.adapters.io import ADAPTER_TENSORS, adapter_mismatches, expected_adapters
from moelora_ds.checkpoints.locate import RUN_FILE, CheckpointError, read_run_info, resolve_checkpoint_dir
from moelora_ds.checkpoints.safe_load import safe_load, vet_checkpoint_files
from moelora_ds.models.loading import meta_model

STAGE0_MODEL_FILE = "mp_rank_00_model_states.pt"


@dataclass
class TrainedAdapters:
    checkpoint_dir: Path
    run_info: dict
    config: MoELoRAConfig
    model_dir: Path
    """The local Hugging Face directory the base model was loaded from."""
    adapters: dict[str, torch.Tensor]
    """Public names (`<path>.lora_A`, ...) -> fp32 tensors."""


def _read_run_info(checkpoint_dir: Path) -> tuple[dict, MoELoRAConfig, Path]:
    path = checkpoint_dir / RUN_FILE
    info = read_run_info(checkpoint_dir)
    try:
        config = MoELoRAConfig(**info["config"]["moelora"])
        stage, model_dir = int(info["zero_stage"]), Path(info["model_dir"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} is corrupt or incomplete ({type(error).__name__}: {error})") from None
    if stage not in (0, 1, 2, 3):
        raise CheckpointError(f"{path}: unknown zero_stage {stage}")
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"the base model directory {model_dir} (model_dir in {path}) has no config.json")
    return info, config, model_dir


def _check_readable(checkpoint_dir: Path) -> None:
    """Every DeepSpeed file must be a complete torch (zip) archive: a truncated one has no central directory."""
    for path in sorted(checkpoint_dir.glob("*_states.pt")):
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as error:
            raise CheckpointError(f"{path} is truncated or corrupt ({error})") from None


def _load_deepspeed_state(checkpoint_dir: Path, stage: int) -> dict[str, torch.Tensor]:
    _check_readable(checkpoint_dir)
    vet_checkpoint_files(checkpoint_dir)
    if stage == 0:
        path = checkpoint_dir / STAGE0_MODEL_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (a ZeRO stage-0 checkpoint keeps its weights there)")
        return safe_load(path)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    quiet = io.StringIO()  # it narrates every step on stdout and draws progress bars on stderr
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name,
                                                        exclude_frozen_parameters=True)


def expected_layers(model_dir: Path, config: MoELoRAConfig) -> dict[str, tuple[int, int]]:
    """Adapted layer path -> (out_features, in_features), from the base architecture built on the meta device."""
    from transformers import AutoConfig

    model = meta_model(AutoConfig.from_pretrained(model_dir))
    return {path: (model.get_submodule(path).out_features, model.get_submodule(path).in_features)
            for path in find_target_linears(model, config)}


def read_trained_adapters(checkpoint: Path, tag: Optional[str] = None) -> TrainedAdapters:
    """The adapters of a checkpoint, checked against the base model and the run's MoE-LoRA configuration."""
    checkpoint_dir = resolve_checkpoint_dir(checkpoint, tag)
    info, config, model_dir = _read_run_info(checkpoint_dir)
    try:
        state = _load_deepspeed_state(checkpoint_dir, int(info["zero_stage"]))
    except CheckpointError:
        raise
    except Exception as error:  # torch.load / zero_to_fp32 on truncated, corrupt or missing rank files
        raise CheckpointError(f"{checkpoint_dir}: cannot read the DeepSpeed checkpoint files "
                              f"({type(error).__name__}: {error})") from None
    adapters = {name: tensor.float() for name, tensor in state.items()
                if any(name.endswith("." + part) for part in ADAPTER_TENSORS)}
    problems = adapter_mismatches(expected_adapters(expected_layers(model_dir, config), config), adapters)
    if problems:
        raise CheckpointError(f"{checkpoint_dir}: " + "; ".join(problems))
    return TrainedAdapters(checkpoint_dir, info, config, model_dir, adapters)
