"""Adapter state dicts: their expected layout, and folding them into base weights (pure functions).

Public adapter names are `<path>.lora_A` (E, r, in), `<path>.lora_B` (E, out, r) and `<path>.router.weight`
(E, in) for the adapted linear layer at `<path>`. A layer with a single expert is exactly a LoRA layer
(the softmax of one router logit is 1), so `W' = W + (alpha/r) B_0 A_0` reproduces it and the router
drops out. A layer with several experts is input-dependent: it is never folded; its base weight is kept
and its adapter tensors travel with it. In the spirit of torchtune's `get_merged_lora_ckpt`.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .moelora_config import MoELoRAConfig

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
        problems.append(f"adapter tensors missing for {len(layers)} layer(s): {_listing(layers)}")
    if unexpected:
        problems.append(f"unexpected adapter tensors: {_listing(unexpected)}")
    if wrong:
        problems.append("wrong shapes: " + _listing(wrong))
    return problems


def _listing(items: list[str], limit: int = 6) -> str:
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
        raise ValueError(f"incomplete adapter layers: {_listing(incomplete)}")
    return layers


def is_foldable(layer: Mapping[str, torch.Tensor]) -> bool:
    """Exactly foldable: a single expert (its gate is always 1)."""
    return layer["lora_A"].shape[0] == 1


def fold(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """`W + scaling * B_0 A_0` of a single-expert layer, computed in fp32 (or better), returned in W's dtype."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    delta = lora_B[0].to(compute) @ lora_A[0].to(compute)
    return (weight.to(compute) + scaling * delta).to(weight.dtype)


def merge_tensor(name: str, tensor: torch.Tensor, layers: Mapping[str, Mapping[str, torch.Tensor]],
                 scaling: float) -> dict[str, torch.Tensor]:
    """The output tensors for one base tensor: itself, its folded form, or itself plus its layer's adapters."""
    path = name.removesuffix(".weight") if name.endswith(".weight") else None
    layer = layers.get(path) if path is not None else None
    if layer is None:
        return {name: tensor}
    out_features, in_features = tensor.shape
    if layer["lora_A"].shape[-1] != in_features or layer["lora_B"].shape[1] != out_features:
        raise ValueError(f"{path}: adapters (lora_A {tuple(layer['lora_A'].shape)}, lora_B "
                         f"{tuple(layer['lora_B'].shape)}) do not fit the base weight {tuple(tensor.shape)}")
    if is_foldable(layer):
        return {name: fold(tensor, layer["lora_A"], layer["lora_B"], scaling)}
    return {name: tensor, **{f"{path}.{part}": value for part, value in layer.items()}}


def merge(base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor],
          scaling: float) -> dict[str, torch.Tensor]:
    """Base state dict + adapters -> the merged state dict (single-expert layers folded, routed ones attached).

    Inputs are not modified. Every adapted layer's `<path>.weight` must be in `base`.
    """
    layers = group_by_layer(adapters)
    unmatched = [path for path in layers if f"{path}.weight" not in base]
    if unmatched:
        raise ValueError(f"adapted layers without a base weight: {_listing(unmatched)}")
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in base.items():
        merged.update(merge_tensor(name, tensor, layers, scaling))
    return merged
