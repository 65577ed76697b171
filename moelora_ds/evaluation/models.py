"""The three things `moelora-eval` scores: the configured base model, a training checkpoint, an exported model.

Under a ZeRO-3 DeepSpeed config (the run's `deepspeed`), the base model and a checkpoint's or adapter export's
adapters are built partitioned (zero.Init) and evaluated through a DeepSpeed engine, as training runs them: each
rank holds 1/world_size of the weights, so evaluation fits wherever training fits. Other stages, and a merged
export (loaded by plain transformers), hold the whole model on every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from deepspeed.accelerator import get_accelerator

from moelora_ds.config import RunConfig
from moelora_ds.models.loading import DTYPES, load_base_model, load_tokenizer, local_model_dir
from moelora_ds.training.deepspeed_config import build_deepspeed_config, zero_stage
from moelora_ds.training.precision import resolve_attention, resolve_dtype


def _on_accelerator(model: torch.nn.Module) -> torch.nn.Module:
    return model.to(get_accelerator().device_name(get_accelerator().current_device())).eval()


def _ready(model: torch.nn.Module, ds_config: Optional[dict]) -> torch.nn.Module:
    """`model` for evaluation: inside a DeepSpeed engine (no optimizer) under ZeRO-3, else on the accelerator."""
    if ds_config is None or zero_stage(ds_config) != 3:
        return _on_accelerator(model)
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=None, config=ds_config)
    engine.eval()  # DeepSpeedEngine.eval returns None
    return engine


def _partitioning(config: RunConfig) -> Optional[dict]:
    """The run's DeepSpeed config when it is ZeRO-3 (for this process group's size), else None."""
    import torch.distributed as dist

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    ds_config = build_deepspeed_config(config, world_size)
    return ds_config if zero_stage(ds_config) == 3 else None


def ships_code(model_dir: Path) -> bool:
    """Whether a model directory's config.json names modeling code of its own (`auto_map`), which loading runs."""
    import json

    try:
        return bool(json.loads((model_dir / "config.json").read_text()).get("auto_map"))
    except (OSError, ValueError):
        return False


def load_for_eval(config: RunConfig, *, checkpoint: Optional[Path] = None, tag: Optional[str] = None,
                  exported: Optional[Path] = None, is_converter: bool = True, barrier=None,
                  trust_remote_code: bool = False):
    """(model, tokenizer, description): the base model of `config`, or a checkpoint's adapters on their base,
    or an exported directory (merged, loaded with plain transformers; or an adapter export on the config's base).
    An exported directory that ships its own modeling code is loaded only with `trust_remote_code`."""
    from transformers import AutoModelForCausalLM

    ds_config = _partitioning(config)
    sharded = " (ZeRO-3 partitioned)" if ds_config is not None else ""
    if checkpoint is not None:
        from moelora_ds.adapters.io import load_adapter_tensors
        from moelora_ds.checkpoints.adapters import read_trained_adapters

        trained = read_trained_adapters(checkpoint, tag)
        model = load_base_model(trained.model_dir, config.model.dtype, ds_config,
                                attention=config.model.attn_implementation)
        load_adapter_tensors(model, trained.adapters, trained.config)
        return (_ready(model, ds_config), load_tokenizer(trained.model_dir),
                f"checkpoint {trained.checkpoint_dir}{sharded}")
    if exported is not None:
        if (exported / "adapter_config.json").is_file():
            from moelora_ds.adapters.io import load_adapter

            model_dir = local_model_dir(config.model, is_converter=is_converter, barrier=barrier)
            base = load_base_model(model_dir, config.model.dtype, ds_config, attention=config.model.attn_implementation)
            model = load_adapter(base, exported)
            return _ready(model, ds_config), load_tokenizer(model_dir), f"adapter export {exported}{sharded}"
        if ships_code(exported) and not trust_remote_code:
            raise ValueError(f"{exported}: this model ships its own modeling code (auto_map in its config.json), "
                             f"which loading it would run; pass --trust-remote-code if you trust that directory")
        dtype = resolve_dtype(config.model.dtype, announce=False)
        model = AutoModelForCausalLM.from_pretrained(
            exported, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
            attn_implementation=resolve_attention(config.model.attn_implementation, dtype))
        tokenizer = load_tokenizer(exported, trust_remote_code=trust_remote_code)
        return _on_accelerator(model), tokenizer, f"exported model {exported}"
    model_dir = local_model_dir(config.model, is_converter=is_converter, barrier=barrier)
    base = load_base_model(model_dir, config.model.dtype, ds_config, attention=config.model.attn_implementation)
    return _ready(base, ds_config), load_tokenizer(model_dir), f"base model {config.model.name_or_path}{sharded}"
