"""Injecting MoE-LoRA layers into a model, and the adapter state dict in the public format."""

from __future__ import annotations

import hashlib
import re
from typing import Iterator

import torch
from torch import nn

from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.layer import MoELoRALinear
from moelora_ds.adapters.targets import PRESETS, preset_linears


def _output_head_names(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def _has_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def find_target_linears(model: nn.Module, config: MoELoRAConfig) -> list[str]:
    """Paths of the nn.Linear modules `config.target_modules` selects: a preset of the model's family ("attention",
    "mlp"), "all-linear" (never the output head), name suffixes or a regex over the full path."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    targets = config.target_modules
    if targets in PRESETS:
        return preset_linears(model, targets)
    if targets == "all-linear":
        heads = _output_head_names(model)
        return [name for name in linears if name not in heads]
    if isinstance(targets, str):
        chosen = [name for name in linears if re.fullmatch(targets, name)]
        unmatched = [] if chosen else [targets]
    else:
        chosen = [name for name in linears if any(_has_suffix(name, t) for t in targets)]
        unmatched = [t for t in targets if not any(_has_suffix(name, t) for name in linears)]
    if unmatched:
        candidates = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ValueError(f"moelora.target_modules: {unmatched} match no nn.Linear in {type(model).__name__}; "
                         f"linear module names available: {candidates}")
    return chosen


def layer_init_seed(seed: int, path: str) -> int:
    """The seed of one layer's adapter initialisation: from the run's seed and the layer's path only, so adding or
    removing a layer leaves every other layer's starting adapters as they were."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{path}".encode()).digest()[:7], "little")


def inject_moelora(model: nn.Module, config: MoELoRAConfig, seed: int = 0) -> nn.Module:
    """Replace every targeted nn.Linear by a MoELoRALinear in place, freeze everything else, return the model.

    The starting adapters depend on `seed` and each layer's path alone (`layer_init_seed`), not on the device,
    dtype or ZeRO partitioning of the base. Works on ZeRO-3 partitioned models too: shapes come from `ds_shape`,
    the base Parameters are reused.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for path in find_target_linears(model, config):
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, MoELoRALinear(getattr(parent, child), config, init_seed=layer_init_seed(seed, path)))
    model.moelora_config = config
    return model


def moelora_layers(model: nn.Module) -> Iterator[tuple[str, MoELoRALinear]]:
    """(path, layer) for every injected layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, MoELoRALinear):
            yield name, module


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter under its public name `<path>.lora_A`, `<path>.lora_B`, `<path>.router.weight`."""
    return {f"{path}.{name}": param
            for path, layer in moelora_layers(model)
            for name, param in layer.adapter_parameters().items()}


def router_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the layers' load-balancing losses from the last forward, or None when it is off."""
    losses = [layer.aux_loss for _, layer in moelora_layers(model) if layer.aux_loss is not None]
    return torch.stack([loss.float() for loss in losses]).sum() if losses else None
