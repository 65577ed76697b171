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
    base = load_base_model(model_dir, config.model.dtype, attention=config.model.attn_implementation)
    return _on_accelerator(base), load_tokenizer(model_dir), \
        f"base model {config.model.name_or_path}"
