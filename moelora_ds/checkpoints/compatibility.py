"""Whether a run may resume a checkpoint: the configuration stored with it (its run info) against the new one.

Two kinds of change, key by key (dotted keys, as in `--section.key=value`):
- another experiment (EXPERIMENT_KEYS): the base model and its precision, the adapters (all of `moelora`), the
  training data (its path, the size and modification time of its files, how it is tokenized and ordered), the
  optimizer kind, the seed, the loss normalization, and the global batch (micro_batch_size x grad_accum x
  ranks). Refused with a ConfigError naming every changed key and the ways out, unless `train.resume_allow`
  names the key (or its section).
- everything else (the schedule's length and shape, learning rates and other optimizer hyperparameters,
  evaluation, logging and checkpoint cadence, ...): allowed, and listed for rank 0 to print. The new values
  take effect: the trainer re-applies the configured optimizer hyperparameters and peak learning rates after
  loading (training/optimizers.reapply_hyperparameters), and builds the schedule from the new configuration.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Union

from moelora_ds.config import ConfigError, RunConfig, config_to_dict

EXPERIMENT_KEYS = ("model.name_or_path", "model.gguf_file", "model.dtype", "moelora", "data.train_path",
                   "data.format", "data.max_length", "data.overlong", "data.train_on_eos", "data.packing",
                   "data.shuffle", "optimizer.name", "train.seed", "train.loss_normalization")
"""Keys (or sections) whose change makes a resumed run another experiment."""
NOT_COMPARED = ("train.resume", "train.resume_allow", "train.output_dir")
"""Keys that say where a run is and how it resumes, not what it trains."""
GLOBAL_BATCH_KEYS = ("train.micro_batch_size", "train.grad_accum")
UNSET = "<unset>"
"""The saved value of a key the checkpoint's configuration does not have (it was written before the key existed):
such a change is allowed and printed, never refused."""


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested configuration dict."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _under(key: str, names) -> bool:
    return any(key == name or key.startswith(name + ".") for name in names)


def data_fingerprint(paths: Union[str, list[str]]) -> str:
    """A hash of the name, size and modification time of the training data files (each file given, every file under
    each directory given); '' when one cannot be read."""
    digest = hashlib.sha256()
    try:
        for path in [paths] if isinstance(paths, str) else paths:
            root = Path(path)
            files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
            for file in files:
                stat = file.stat()
                digest.update(f"{path}:{file.relative_to(root) if root.is_dir() else file.name}:{stat.st_size}:"
                              f"{stat.st_mtime_ns}\n".encode())
    except OSError:
        return ""
    return digest.hexdigest()


def check_resume_allow(config: RunConfig) -> None:
    """A ConfigError when train.resume_allow names something that is not a configuration key or section."""
    keys = flatten(config_to_dict(config))
    unknown = [name for name in config.train.resume_allow if not any(_under(key, [name]) for key in keys)]
    if unknown:
        raise ConfigError(f"{config.source}: train.resume_allow: {unknown} are not configuration keys "
                          f"(expected keys like data.train_path or sections like moelora)")


def changed_keys(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, current value)} of every compared key that differs between two configuration dicts."""
    old, new = flatten(saved), flatten(current)
    return {key: (old.get(key, UNSET), new.get(key, UNSET)) for key in sorted(old.keys() | new.keys())
            if old.get(key, UNSET) != new.get(key, UNSET) and not _under(key, NOT_COMPARED)}


def check_resume_compatible(config: RunConfig, info: dict, world_size: int, fingerprint: str,
                            checkpoint_dir: Path) -> list[str]:
    """Refuse (ConfigError) resuming `checkpoint_dir` (run info `info`) as another experiment; return the allowed
    changes as 'key: old -> new' lines."""
    saved = info["config"]
    changed = changed_keys(saved, config_to_dict(config))
    saved_fingerprint = info.get("data_fingerprint")
    if saved_fingerprint and fingerprint != saved_fingerprint and "data.train_path" not in changed:
        changed["data.train_path"] = (f"{saved['data']['train_path']} (as saved)",
                                      "the same path, with files of another size or modification time")
    saved_batch = saved["train"]["micro_batch_size"] * saved["train"]["grad_accum"] * int(info["world_size"])
    batch = config.train.micro_batch_size * config.train.grad_accum * world_size
    experiment = [key for key, (old, _) in changed.items() if _under(key, EXPERIMENT_KEYS) and old != UNSET]
    if batch != saved_batch:
        experiment += [key for key in GLOBAL_BATCH_KEYS if key in changed] or ["train.grad_accum"]
        changed.setdefault("train.grad_accum", (saved["train"]["grad_accum"], config.train.grad_accum))
    refused = [key for key in experiment if not _under(key, config.train.resume_allow)]
    if refused:
        lines = "; ".join(f"{key}: {changed[key][0]!r} -> {changed[key][1]!r}" for key in refused)
        note = (f" (global batch micro_batch_size x grad_accum x ranks {saved_batch} -> {batch})"
                if batch != saved_batch else "")
        raise ConfigError(f"{config.source}: train.resume: {checkpoint_dir} was trained as another experiment: "
                          f"{lines}{note}. Start afresh with --train.resume=never or another train.output_dir, or, "
                          f"if resuming is intended, allow the change with "
                          f"--train.resume_allow={','.join(refused)}")
    return [f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items()]
