"""Checks of a run's configuration against its DeepSpeed config, its base model and the checkpoint it resumes
from, before any rank loads the model.

`preflight(config)` runs in every rank's process before the process group exists (cli.train_main), so a
mistake fails every rank at once, within seconds, with a ConfigError naming the file and key, instead of
after minutes of model loading or as a hang. The architecture is read from the model's config alone and
built on the meta device: no weights are read and no memory is allocated.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CHECKPOINTS, resolve_resume
from .config import ConfigError, RunConfig
from .ds_config import build_deepspeed_config
from .inject import find_target_linears
from .model_loading import _gguf_path, gguf_cache_dir, resolve_model_dir


def base_model_config(config: RunConfig):
    """The base model's transformers config: from its directory, the GGUF conversion cache, or the GGUF header."""
    from transformers import AutoConfig

    try:
        if not config.model.gguf_file:
            return AutoConfig.from_pretrained(resolve_model_dir(config.model.name_or_path))
        gguf = _gguf_path(config.model)
        converted = gguf_cache_dir(gguf)
        if (converted / "config.json").is_file():
            return AutoConfig.from_pretrained(converted)
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ConfigError as error:
        raise ConfigError(f"{config.source}: {error}") from None
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(f"{config.source}: model.name_or_path: cannot read the model's configuration "
                          f"({type(error).__name__}: {error})") from None


def check_target_modules(config: RunConfig) -> list[str]:
    """The paths moelora.target_modules selects in the base architecture (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    model_config = base_model_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    try:
        return find_target_linears(model, config.moelora)
    except ValueError as error:
        raise ConfigError(f"{config.source}: {error}") from None


def check_resume(config: RunConfig) -> None:
    """train.resume names a checkpoint that is there (auto: the one `latest` names, if any)."""
    resolve_resume(Path(config.train.output_dir) / CHECKPOINTS, config.train.resume, config.source)


def preflight(config: RunConfig) -> None:
    """Every check that needs no process group: the DeepSpeed config agrees, target_modules match the model,
    the checkpoint to resume from exists."""
    build_deepspeed_config(config)
    check_target_modules(config)
    check_resume(config)
