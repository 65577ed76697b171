"""Folding adapters into base weights (pure functions).

A layer with a single expert is exactly a LoRA layer (the softmax of one router logit is 1), so
`W' = W + (alpha/r) B_0 A_0` reproduces it and the router drops out. A layer with several experts is
input-dependent: it is never folded; its base weight is kept and its adapter tensors travel with it. In the
spirit of torchtune's `get_merged_lora_ckpt`.
"""

from __future__ import annotations

from typing import Mapping

import torch

from moelora_ds.adapters.io import group_by_layer, listing


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
        raise ValueError(f"adapted layers without a base weight: {listing(unmatched)}")
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in base.items():
        merged.update(merge_tensor(name, tensor, layers, scaling))
    return merged
