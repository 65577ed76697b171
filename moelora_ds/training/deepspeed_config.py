"""The DeepSpeed config of a run: the user's JSON plus the values the training config owns, checked to agree."""

from __future__ import annotations

import json
from pathlib import Path

from moelora_ds.config import REPO_ROOT, ConfigError, RunConfig
from moelora_ds.training.precision import resolve_dtype


def resolve_deepspeed_path(path: str) -> Path:
    """A DeepSpeed JSON path as given, else relative to the repository (so `ds_configs/zero3.json` works anywhere)."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"deepspeed: config file {path!r} not found (also looked in {REPO_ROOT})")


def read_deepspeed_config(config: RunConfig) -> tuple[dict, str]:
    """The user's DeepSpeed dict and a name for it in messages."""
    if isinstance(config.deepspeed, dict):
        return dict(config.deepspeed), f"{config.source}: deepspeed"
    path = resolve_deepspeed_path(config.deepspeed)
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON: {error}") from None


def owned_values(config: RunConfig) -> dict[str, tuple[object, str]]:
    """DeepSpeed keys the training config decides: key -> (value, the training-config key that sets it)."""
    dtype = resolve_dtype(config.model.dtype, announce=False)
    return {
        "train_micro_batch_size_per_gpu": (config.train.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (config.train.grad_accum, "train.grad_accum"),
        "gradient_clipping": (config.train.grad_clip, "train.grad_clip"),
        "bf16.enabled": (dtype == "bfloat16", "model.dtype"),
        "fp16.enabled": (dtype == "float16", "model.dtype"),
    }


def build_deepspeed_config(config: RunConfig, world_size: int | None = None) -> dict:
    """Fill the owned values into the user's DeepSpeed config; a contradicting value is a ConfigError."""
    ds, name = read_deepspeed_config(config)
    for dotted, (value, source_key) in owned_values(config).items():
        section, _, key = dotted.rpartition(".")
        node = ds.setdefault(section, {}) if section else ds
        current = node.get(key, "auto")
        if current != "auto" and current != value:
            raise ConfigError(f"{name}: '{dotted}' is {current!r} but {config.source}: {source_key} "
                              f"implies {value!r}; remove it from the DeepSpeed config or make them agree")
        node[key] = value
    if world_size is not None:
        global_batch = config.train.micro_batch_size * config.train.grad_accum * world_size
        if ds.get("train_batch_size", "auto") not in ("auto", global_batch):
            raise ConfigError(f"{name}: 'train_batch_size' is {ds['train_batch_size']!r} but micro_batch_size x "
                              f"grad_accum x world_size = {global_batch}")
        ds["train_batch_size"] = global_batch
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{name}: 'zero_optimization.stage' must be 0, 1, 2 or 3, got {stage!r}")
    ds.setdefault("zero_allow_untested_optimizer", True)
    if offloads_optimizer(ds) and config.optimizer.name.endswith("sgd"):
        ds.setdefault("zero_force_ds_cpu_optimizer", False)  # DeepSpeed has no CPU SGD; torch's runs on the CPU copy
    ds.setdefault("steps_per_print", 10**9)
    return ds


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_config: dict) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")
