"""Checks across a run's configuration (values, combinations), advisories, and its plain-dict form."""

from __future__ import annotations

import json
from dataclasses import fields, is_dataclass
from typing import Any

from moelora_ds.config.sections import ConfigError, RunConfig


def validate(config: RunConfig) -> None:
    """Cross-field checks that no single field can make."""
    train, src = config.train, config.source
    if (train.max_steps is None) == (train.epochs is None):
        raise ConfigError(f"{src}: train: set exactly one of max_steps and epochs "
                          f"(got max_steps={train.max_steps}, epochs={train.epochs})")
    positive = {"train.micro_batch_size": train.micro_batch_size, "train.grad_accum": train.grad_accum,
                "train.log_every": train.log_every, "health.every": config.health.every,
                "train.collective_timeout_s": train.collective_timeout_s,
                "data.max_length": config.data.max_length,
                "optimizer.lr": config.optimizer.lr, "optimizer.reg": config.optimizer.reg}
    if train.max_steps is not None:
        positive["train.max_steps"] = train.max_steps
    if train.epochs is not None:
        positive["train.epochs"] = train.epochs
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{src}: {key}: expected a positive value, got {value!r}")
    if train.stop_at is not None and train.stop_at < 1:
        raise ConfigError(f"{src}: train.stop_at: expected a positive step or null, got {train.stop_at}")
    for key in ("save_every", "save_every_minutes", "eval_every", "keep_checkpoints", "loss_chunk_tokens"):
        if getattr(train, key) < 0:
            raise ConfigError(f"{src}: train.{key}: expected 0 or more, got {getattr(train, key)}")
    if train.grad_clip < 0:
        raise ConfigError(f"{src}: train.grad_clip: expected 0 (off) or a positive norm, got {train.grad_clip}")
    if not config.optimizer.router_clip >= 0:
        raise ConfigError(f"{src}: optimizer.router_clip: expected 0 (off) or a positive norm, "
                          f"got {config.optimizer.router_clip}")
    if config.optimizer.router_lr is not None and config.optimizer.router_lr < 0:
        raise ConfigError(f"{src}: optimizer.router_lr: expected a non-negative value, "
                          f"got {config.optimizer.router_lr}")
    if not 0 <= config.scheduler.min_lr_ratio <= 1:
        raise ConfigError(f"{src}: scheduler.min_lr_ratio: expected a value in [0, 1], "
                          f"got {config.scheduler.min_lr_ratio}")
    if config.scheduler.warmup_steps < 0:
        raise ConfigError(f"{src}: scheduler.warmup_steps: expected 0 or more, got {config.scheduler.warmup_steps}")
    if train.report_to is not None and len(set(train.report_to)) != len(train.report_to):
        raise ConfigError(f"{src}: train.report_to: expected each tracker once, got {train.report_to}")
    if train.run_name is not None and not train.run_name.strip():
        raise ConfigError(f"{src}: train.run_name: expected a name or null (the output directory's name), got ''")
    if config.data.prepare_workers is not None and config.data.prepare_workers < 1:
        raise ConfigError(f"{src}: data.prepare_workers: expected a positive number or null, "
                          f"got {config.data.prepare_workers}")
    if config.data.train_path == []:
        raise ConfigError(f"{src}: data.train_path: expected a path or a non-empty list of paths")
    if not config.data.choices or len(set(config.data.choices)) != len(config.data.choices):
        raise ConfigError(f"{src}: data.choices: expected distinct answer labels, got {config.data.choices}")
    health = config.health
    if not 0 <= health.dead_share < 1:
        raise ConfigError(f"{src}: health.dead_share: expected a value in [0, 1), got {health.dead_share}")
    if not 0 < health.max_share <= 1:
        raise ConfigError(f"{src}: health.max_share: expected a value in (0, 1], got {health.max_share}")
    if health.patience < 1:
        raise ConfigError(f"{src}: health.patience: expected a positive number of intervals, got {health.patience}")


def advisories(config: RunConfig) -> list[str]:
    """Valid settings that probably do not do what the user wants; the trainer prints them at start-up."""
    notes = []
    if config.optimizer.name == "riemannian_sgd" and config.train.grad_clip > 0:
        notes.append(f"{config.source}: train.grad_clip={config.train.grad_clip:g} with optimizer.name=riemannian_sgd "
                     "clips the preconditioned gradient, whose A part is large while B is near 0, so every early "
                     "update shrinks (benchmarks/RESULTS.md, benchmark 4); train.grad_clip=0 is recommended")
    return notes


def config_to_dict(config: RunConfig) -> dict:
    """The configuration as plain JSON-able data (what checkpoints record)."""
    def convert(obj: Any) -> Any:
        if is_dataclass(obj):
            return {f.name: convert(getattr(obj, f.name)) for f in fields(obj) if not f.metadata.get("internal")}
        if isinstance(obj, tuple):
            return list(obj)
        return obj
    return json.loads(json.dumps(convert(config)))
