"""Exporting trained adapters: a self-contained Hugging Face model directory (merged) or the adapters alone.

Merged export streams the base model's safetensors tensor by tensor: every tensor is written unchanged
(in its original dtype), folded (single-expert layers, exact), or followed by its layer's adapter tensors
(routed layers, never folded), into shards written as they fill. If any layer stays routed, config.json
names the bundled `modeling_moelora.py` in `auto_map` (load with `trust_remote_code=True`); if every layer
folds, the directory is the plain base architecture. Output is staged next to `out` and renamed into place
when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Literal, Mapping, Optional

import torch

from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.io import group_by_layer, save_adapter
from moelora_ds.adapters.merge import is_foldable, merge_tensor
from moelora_ds.checkpoints.adapters import read_trained_adapters
from moelora_ds.export.safetensors_stream import (
    ShardedSafetensorsWriter,
    iter_safetensors,
    parse_size,
    safetensors_files,
    tensor_bytes,
)
from moelora_ds.telemetry.progress import progress

REMOTE_CODE = Path(__file__).with_name("remote_code") / "modeling_moelora.py"
AUTO_MAP = {"AutoConfig": "modeling_moelora.MoELoRAConfig",
            "AutoModelForCausalLM": "modeling_moelora.MoELoRAForCausalLM"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")

ExportMode = Literal["merged", "adapter"]


class ExportError(Exception):
    """An export that cannot be written as asked (output directory, shard size, base model)."""


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already exists and is not an empty directory")


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh directory next to `out`, renamed to `out` on success and removed on failure."""
    _check_out(out)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy_side_files(model_dir: Path, out: Path) -> None:
    """Tokenizer, generation config, chat template, model card...: every top-level non-weight file but config.json."""
    for path in model_dir.iterdir():
        if path.is_file() and path.name != "config.json" and not path.name.startswith(".") \
                and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, out / path.name)


def merged_config(base_config: dict, config: MoELoRAConfig, routed: list[str]) -> dict:
    """config.json of a merged export: the base config itself, or the remote-code config wrapping it."""
    if not routed:
        return base_config
    if "auto_map" in base_config:
        raise ExportError("the base model uses its own remote code (auto_map in its config.json): export it with "
                          "--mode adapter, or train with a single expert so that every layer folds")
    return {"model_type": "moelora", "architectures": ["MoELoRAForCausalLM"], "auto_map": AUTO_MAP,
            "base_config": base_config,
            "moelora": {**config.to_dict(), "top_k": config.routed_top_k, "modules": routed},
            "transformers_version": base_config.get("transformers_version")}


def export_merged(model_dir: Path, adapters: Mapping[str, torch.Tensor], config: MoELoRAConfig, out: Path,
                  max_shard_bytes: int) -> Path:
    """Stream the base weights of `model_dir` with `adapters` merged into a loadable directory `out`."""
    layers = group_by_layer(adapters)
    weight_of = {f"{path}.weight": path for path in layers}
    base_config = json.loads((model_dir / "config.json").read_text())
    routed = [path for path, layer in layers.items() if not is_foldable(layer)]
    config_json = merged_config(base_config, config, routed)
    with _staging(out) as staging:
        writer = ShardedSafetensorsWriter(staging, max_shard_bytes)
        merged = set()
        bar = progress(desc="export", total=sum(path.stat().st_size for path in safetensors_files(model_dir)),
                       unit="B", unit_scale=True)
        for name, tensor in iter_safetensors(model_dir):
            bar.update(tensor_bytes(tensor))
            if name in weight_of:
                merged.add(weight_of[name])
            for out_name, out_tensor in merge_tensor(name, tensor, layers, config.scaling).items():
                writer.add(out_name, out_tensor)
        bar.close()
        unmatched = sorted(set(layers) - merged)
        if unmatched:
            raise ExportError(f"{model_dir}: no stored weight for adapted layer(s) {unmatched[:6]} (a tied weight "
                              f"cannot carry an adapter)")
        writer.close()
        _copy_side_files(model_dir, staging)
        (staging / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        if routed:
            shutil.copy2(REMOTE_CODE, staging / REMOTE_CODE.name)
    return out


def base_model_info(model_dir: Path, run_config: dict) -> dict:
    """What adapter_config.json records about the base model."""
    base_config = json.loads((model_dir / "config.json").read_text())
    model = run_config.get("model", {})
    return {"model_dir": str(model_dir), "name_or_path": model.get("name_or_path"), "gguf_file": model.get("gguf_file"),
            "model_type": base_config.get("model_type"), "architectures": base_config.get("architectures")}


def export_adapter(adapters: Mapping[str, torch.Tensor], config: MoELoRAConfig, base_model: dict, out: Path) -> Path:
    with _staging(out) as staging:
        save_adapter(staging, adapters, config, base_model)
    return out


def export_checkpoint(checkpoint: Path, out: Path, mode: ExportMode = "merged", tag: Optional[str] = None,
                      max_shard_size: str | int = "2GB") -> Path:
    """`moelora-export`: read a training checkpoint (any ZeRO stage, any world size) and export it."""
    if mode not in ("merged", "adapter"):
        raise ExportError(f"--mode: expected merged or adapter, got {mode!r}")
    try:
        max_shard_bytes = parse_size(max_shard_size)
    except ValueError as error:
        raise ExportError(f"--max-shard-size: {error}") from None
    _check_out(out)
    trained = read_trained_adapters(checkpoint, tag)
    if mode == "adapter":
        base_model = base_model_info(trained.model_dir, trained.run_info["config"])
        return export_adapter(trained.adapters, trained.config, base_model, out)
    return export_merged(trained.model_dir, trained.adapters, trained.config, out, max_shard_bytes)
