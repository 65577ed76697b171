"""`create_riemannian_optimizer`: any optimizer class, fed Riemannian-preconditioned expert gradients."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from moelora_ds.adapters.inject import moelora_layers

EXPERTS, ROUTERS = "experts", "routers"
"""The names of the two parameter groups: the expert factors, and the routers with any other trainable parameter."""


def set_preconditioning(model: nn.Module, reg: Optional[float]) -> None:
    """Turn the in-backward preconditioner on (damping `reg`) or off (None) for every MoE-LoRA layer."""
    if reg is not None and not reg > 0:
        raise ValueError(f"optimizer.reg: expected a positive damping, got {reg!r}")
    for _, layer in moelora_layers(model):
        layer.riemannian_reg = None if reg is None else float(reg)


def adapter_param_groups(model: nn.Module, *, lr: float, router_lr: Optional[float] = None,
                         weight_decay: Optional[float] = None) -> list[dict[str, Any]]:
    """Two groups: the expert factors (lr) and everything else trainable, routers included (router_lr or lr)."""
    experts = [p for _, layer in moelora_layers(model) for p in (layer.lora_A, layer.lora_B) if p.requires_grad]
    expert_ids = {id(p) for p in experts}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in expert_ids]
    if not experts:
        raise ValueError("the model has no trainable MoE-LoRA experts: call inject_moelora(model, config) first")
    extra = {} if weight_decay is None else {"weight_decay": weight_decay}
    groups = [{"params": experts, "lr": lr, "name": EXPERTS, **extra}]
    if others:
        groups.append({"params": others, "lr": lr if router_lr is None else router_lr, "name": ROUTERS, **extra})
    return groups


def create_riemannian_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float,
                                reg: float = 1e-6, router_lr: Optional[float] = None,
                                **kwargs: Any) -> torch.optim.Optimizer:
    """An `optimizer_cls` whose expert A/B gradients arrive Riemannian-preconditioned (docs/METHOD.md section 2).

    `torch.optim.AdamW` gives scaled AdamW (Adam's moments see the preconditioned gradient),
    `torch.optim.SGD` scaled GD; routers and other trainable parameters are not preconditioned and use
    `router_lr` if given. The preconditioner runs inside backward, on each rank's local gradient, so the
    returned object is an ordinary `optimizer_cls` that DeepSpeed may wrap, partition or offload at
    any ZeRO stage (docs/METHOD.md section 3). Gradient clipping therefore clips the preconditioned gradient.
    """
    set_preconditioning(model, reg)
    return optimizer_cls(adapter_param_groups(model, lr=lr, router_lr=router_lr), lr=lr, **kwargs)
