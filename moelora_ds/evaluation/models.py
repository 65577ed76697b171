"""The three things `moelora-eval` scores: the configured base model, a training checkpoint, an exported model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from deepspeed.accelerator import get_accelerator

from moelora_ds.config import RunConfig
from moelora_ds.models.loading import DTYPES, load_base_model, load_tokenizer, local_model_dir
from moelora_ds.training.precision import resolve_attention, resolve_dtype


def _on_accelerator(model: torch.nn.Module) -> torch.nn.Module:
    return model.to(get_accelerator().device_name(get_accelerator().current_device())).eval()


def load_for_eval(config: RunConfig, *, checkpoint: Optional[Path] = None, tag: Optional[str] = None,
                  exported: Optional[Path] = None, is_converter: bool = True, barrier=None):
    """(model, tokenizer, description): the base model of `config`, or a checkpoint's adapters on their base,
    or an exported directory (merged, loaded with plain transformers; or an adapter export on the config's base)."""
    from transformers import AutoModelForCausalLM

    if checkpoint is not None:
        from moelora_ds.adapters.io import load_adapter_tensors
        from moelora_ds.checkpoints.adapters import read_trained_adapters

        trained = read_trained_adapters(checkpoint, tag)
        model = load_base_model(trained.model_dir, config.model.dtype, attention=config.model.attn_implementation)
        load_adapter_tensors(model, trained.adapters, trained.config)
        return _on_accelerator(model), load_tokenizer(trained.model_dir), f"checkpoint {trained.checkpoint_dir}"
    if exported is not None:
        if (exported / "adapter_config.json").is_file():
            from moelora_ds.adapters.io import load_adapter

            model_dir = local_model_dir(config.model, is_converter=is_converter, barrier=barrier)
            base = load_base_model(model_dir, config.model.dtype, attention=config.model.attn_implementation)
            model = load_adapter(base, exported)
            return _on_accelerator(model), load_tokenizer(model_dir), f"adapter export {exported}"
        dtype = resolve_dtype(config.model.dtype, announce=False)
        model = AutoModelForCausalLM.from_pretrained(
            exported, dtype=DTYPES[dtype], trust_remote_code=True,
            attn_implementation=resolve_attention(config.model.attn_implementation, dtype))
        return _on_accelerator(model), load_tokenizer(exported, trust_remote_code=True), f"exported model {exported}"
    model_dir = local_model_dir(config.model, is_converter=is_converter, barrier=barrier)
    base = load_base_model(model_dir, config.model.dtype, attention=config.model.attn_implementation)
    return _on_accelerator(base), load_tokenizer(model_dir), \
        f"base model {config.model.name_or_path}"
