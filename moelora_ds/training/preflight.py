"""Checks of a run's configuration against its DeepSpeed config, its base model and the checkpoint it resumes
from, before any rank loads the model.

`preflight(config)` runs in every rank's process before the process group exists (cli.train_main), so a
mistake fails every rank at once, within seconds, with a ConfigError naming the file and key, instead of
after minutes of model loading or as a hang. The architecture is read from the model's config alone and
built on the meta device: no weights are read and no memory is allocated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from moelora_ds.adapters.inject import find_target_linears
from moelora_ds.checkpoints.compatibility import check_resume_allow
from moelora_ds.checkpoints.locate import CHECKPOINTS, CheckpointError, read_run_info, resolve_resume
from moelora_ds.checkpoints.reshard import needs_universal
from moelora_ds.config import ConfigError, RunConfig
from moelora_ds.models.loading import gguf_cache_dir, gguf_path, meta_model, resolve_model_dir
from moelora_ds.telemetry.trackers import missing
from moelora_ds.training.deepspeed_config import build_deepspeed_config


def base_model_config(config: RunConfig):
    """The base model's transformers config: from its directory, the GGUF conversion cache, or the GGUF header."""
    from transformers import AutoConfig

    try:
        if not config.model.gguf_file:
            return AutoConfig.from_pretrained(resolve_model_dir(config.model.name_or_path))
        gguf = gguf_path(config.model)
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
    model = meta_model(base_model_config(config))
    try:
        return find_target_linears(model, config.moelora)
    except ValueError as error:
        raise ConfigError(f"{config.source}: {error}") from None


def resume_point(config: RunConfig) -> Optional[tuple[Path, str]]:
    """train.resume as (checkpoint root, tag), or None to start fresh; a ConfigError when it names no checkpoint."""
    root = Path(config.train.output_dir) / CHECKPOINTS
    try:
        return resolve_resume(root, config.train.resume)
    except CheckpointError as error:
        raise ConfigError(f"{config.source}: train.resume: {config.train.resume}: {error}. Resume from a complete "
                          f"checkpoint with --train.resume=DIR, or start over in a new train.output_dir") from None


def resume_needs_universal(config: RunConfig, checkpoint_dir: Path, world_size: int) -> bool:
    """Whether resuming `checkpoint_dir` on `world_size` ranks needs a universal conversion (checkpoints/reshard.py);
    a ConfigError when the global batch would change."""
    global_batch = config.train.micro_batch_size * config.train.grad_accum * world_size
    try:
        return needs_universal(read_run_info(checkpoint_dir), world_size, global_batch, checkpoint_dir)
    except CheckpointError as error:
        raise ConfigError(f"{config.source}: train.grad_accum: {error}") from None


def check_report_to(config: RunConfig) -> None:
    """A ConfigError naming train.report_to and the extra to install for each requested tracker not installed."""
    absent = missing(config.train.report_to)
    if absent:
        installs = " and ".join(f"`pip install moelora-ds[{name}]`" for name in absent)
        raise ConfigError(f"{config.source}: train.report_to: {', '.join(absent)} "
                          f"{'is' if len(absent) == 1 else 'are'} not installed; run {installs}, or remove "
                          f"{'it' if len(absent) == 1 else 'them'} from train.report_to")


def preflight(config: RunConfig) -> None:
    """Every check that needs no process group: the trackers are installed, the DeepSpeed config agrees,
    target_modules match the model, the checkpoint to resume from exists, train.resume_allow names configuration
    keys."""
    check_report_to(config)
    build_deepspeed_config(config)
    check_target_modules(config)
    check_resume_allow(config)
    resume_point(config)
