"""The adapter format: tensor names and shapes, and adapter directories (save, read, load into a model).

Public adapter names are `<path>.lora_A` (E, r, in), `<path>.lora_B` (E, out, r) and `<path>.router.weight`
(E, in) for the adapted linear layer at `<path>`. An adapter directory holds `adapter_model.safetensors`
(public names) and `adapter_config.json` (the MoELoRAConfig dict plus `base_model`: where and what the
base model was).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.inject import adapter_parameters, inject_moelora, moelora_layers
from moelora_ds.adapters.layer import full_shape

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "moelora-ds-adapter"


ADAPTER_TENSORS = ("lora_A", "lora_B", "router.weight")
"""Names of a layer's adapter tensors, relative to the layer's path."""


def adapter_shapes(config: MoELoRAConfig, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    """The adapter tensors of one layer and their shapes."""
    experts, rank = config.num_experts, config.rank
    return {"lora_A": (experts, rank, in_features), "lora_B": (experts, out_features, rank),
            "router.weight": (experts, in_features)}


def expected_adapters(layers: Mapping[str, tuple[int, int]], config: MoELoRAConfig) -> dict[str, tuple[int, ...]]:
    """Public name -> shape of every adapter tensor, for `layers`: path -> (out_features, in_features)."""
    return {f"{path}.{name}": shape for path, (out_f, in_f) in layers.items()
            for name, shape in adapter_shapes(config, out_f, in_f).items()}


def adapter_mismatches(expected: Mapping[str, tuple[int, ...]], adapters: Mapping[str, torch.Tensor]) -> list[str]:
    """What is wrong with `adapters` against `expected` (missing, unexpected, wrong shape); empty when they match."""
    missing = [name for name in expected if name not in adapters]
    unexpected = [name for name in adapters if name not in expected]
    wrong = [f"{name} has shape {tuple(adapters[name].shape)}, expected {shape}"
             for name, shape in expected.items() if name in adapters and tuple(adapters[name].shape) != shape]
    problems = []
    if missing:
        by_layer: dict[str, list[str]] = {}
        for name in missing:
            part = next(s for s in ADAPTER_TENSORS if name.endswith("." + s))
            by_layer.setdefault(name[:-len(part) - 1], []).append(part)
        layers = [f"{path} ({', '.join(parts)})" for path, parts in by_layer.items()]
        problems.append(f"adapter tensors missing for {len(layers)} layer(s): {listing(layers)}")
    if unexpected:
        problems.append(f"unexpected adapter tensors: {listing(unexpected)}")
    if wrong:
        problems.append("wrong shapes: " + listing(wrong))
    return problems


def listing(items: list[str], limit: int = 6) -> str:
    """The first `limit` items, comma-separated, and how many more there are."""
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def group_by_layer(adapters: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{path: {"lora_A": ..., "lora_B": ..., "router.weight": ...}}; a layer lacking one of them is an error."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in adapters.items():
        suffix = next((s for s in ADAPTER_TENSORS if name.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"{name!r} is not an adapter tensor name (expected <path>.{'|'.join(ADAPTER_TENSORS)})")
        layers.setdefault(name[:-len(suffix) - 1], {})[suffix] = tensor
    incomplete = [f"{path} (has {sorted(parts)})" for path, parts in layers.items()
                  if len(parts) != len(ADAPTER_TENSORS)]
    if incomplete:
        raise ValueError(f"incomplete adapter layers: {listing(incomplete)}")
    return layers


class AdapterError(ValueError):
    """An adapter directory that does not fit the model it is loaded into (or is no adapter at all)."""


def save_adapter(out_dir: Path, adapters: Mapping[str, torch.Tensor], config: MoELoRAConfig, base_model: dict) -> None:
    """Write the adapter weights and config into an existing directory."""
    save_file({name: tensor.contiguous() for name, tensor in adapters.items()}, str(out_dir / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps({"format": FORMAT, **config.to_dict(), "base_model": base_model},
                                                     indent=2) + "\n")


def read_adapter_config(adapter_dir: Path) -> tuple[MoELoRAConfig, dict]:
    """(MoE-LoRA config, base model info) of an adapter directory."""
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{adapter_dir} is not a moelora-ds adapter directory (needs {ADAPTER_CONFIG} and "
                           f"{ADAPTER_WEIGHTS}, as `moelora-export --mode adapter` writes them)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AdapterError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
        raise AdapterError(f"{path}: not a moelora-ds adapter config (no \"format\": \"{FORMAT}\")")
    base_model = data.pop("base_model", {})
    try:
        return MoELoRAConfig(**data), base_model
    except (TypeError, ValueError) as error:
        raise AdapterError(f"{path}: {error}") from None


def _check_injected(model: nn.Module, config: MoELoRAConfig) -> None:
    """The layers already injected must compute what the adapter was trained for."""
    wanted = {"num_experts": config.num_experts, "rank": config.rank, "scaling": config.scaling,
              "top_k": config.routed_top_k}
    for path, layer in moelora_layers(model):
        found = {key: getattr(layer, key) for key in wanted}
        if found != wanted:
            raise AdapterError(f"{path}: the model's MoE-LoRA layer has {found} but the adapter needs {wanted}")


def load_adapter_tensors(model: nn.Module, weights: Mapping[str, torch.Tensor], config: MoELoRAConfig,
                         source: str = "the adapter") -> nn.Module:
    """Inject MoE-LoRA (unless already injected) and copy adapter tensors (public names) into it."""
    if next(moelora_layers(model), None) is None:
        inject_moelora(model, config)
    else:
        _check_injected(model, config)
    params = adapter_parameters(model)
    expected = {name: tuple(full_shape(param)) for name, param in params.items()}
    problems = adapter_mismatches(expected, weights)
    if problems:
        raise AdapterError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    partitioned = [name for name, param in params.items() if param.numel() != weights[name].numel()]
    if partitioned:
        raise AdapterError(f"adapter parameters are ZeRO-3 partitioned ({partitioned[0]}, ...): "
                           f"call load_adapter before deepspeed.initialize")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    return model


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Inject MoE-LoRA (unless already injected) and load an adapter export's weights; returns the model.

    Under ZeRO-3 call it before `deepspeed.initialize` (the adapters are not partitioned yet then).
    """
    adapter_dir = Path(adapter_dir)
    config, _ = read_adapter_config(adapter_dir)
    return load_adapter_tensors(model, load_file(str(adapter_dir / ADAPTER_WEIGHTS)), config, str(adapter_dir))
