"""The optimizer a run's configuration names, as DeepSpeed receives it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moelora_ds.adapters.adamw import AdamWNoBiasCorrection
from moelora_ds.adapters.optimizer import adapter_param_groups, create_riemannian_optimizer, set_preconditioning
from moelora_ds.config import OptimizerConfig
from moelora_ds.training.router_clip import clip_router_gradients


def optimizer_class(name: str, offload: bool, bias_correction: bool = True) -> tuple[type[torch.optim.Optimizer], dict]:
    """The base optimizer class and its keyword arguments; AdamW becomes DeepSpeed's CPU Adam under offload."""
    if name.endswith("adamw"):
        if offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam, {"adamw_mode": True, "bias_correction": bias_correction}
        return (torch.optim.AdamW if bias_correction else AdamWNoBiasCorrection), {}
    return torch.optim.SGD, {}


def build_optimizer(model: nn.Module, config: OptimizerConfig, *, offload: bool, partitioned: bool = False,
                    device: Optional[torch.device] = None) -> torch.optim.Optimizer:
    """The configured optimizer over the model's adapters; `partitioned` (ZeRO stages 1-3) and `device` (where
    ranks all-reduce) are what the router clip needs (router_clip.py)."""
    cls, extra = optimizer_class(config.name, offload, config.bias_correction)
    if config.name.endswith("adamw"):
        extra.update(betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)
    else:
        extra.update(momentum=config.momentum, weight_decay=config.weight_decay)
    if config.name.startswith("riemannian_"):
        optimizer = create_riemannian_optimizer(model, cls, lr=config.lr, reg=config.reg, router_lr=config.router_lr,
                                                **extra)
    else:
        set_preconditioning(model, None)
        optimizer = cls(adapter_param_groups(model, lr=config.lr, router_lr=config.router_lr), lr=config.lr, **extra)
    if config.router_clip > 0:
        clip_router_gradients(optimizer, config.router_clip, partitioned=partitioned, device=device)
    return optimizer


def undo_state_initialization_step(optimizer) -> None:
    """Forget the zero-gradient `step()` DeepSpeed's ZeRO-0 bf16/fp16 wrapper takes to create optimizer state.

    DeepSpeed 0.19.8's `FP16_UnfusedOptimizer` (stage 0 with bf16 or fp16 and a non-fused optimizer) calls the
    inner optimizer's `step()` once at construction. Adam counts it, so every early update uses the next step's
    bias correction (the first is 0.735x too small at beta2 0.95), and decoupled weight decay shrinks the fp32
    masters once.
    Dropping the state and re-reading the masters from the model makes the first real step the first step.
    """
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(optimizer, FP16_UnfusedOptimizer):
        optimizer.optimizer.state.clear()
        optimizer.refresh_fp32_params()


CONFIGURED_HYPERPARAMETERS = ("initial_lr", "betas", "eps", "weight_decay", "momentum", "bias_correction")
"""What the configuration sets in a parameter group (`initial_lr`: the peak learning rate the schedule scales)."""


def configured_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Every parameter group's configured hyperparameters, to re-apply once a checkpoint's have been loaded."""
    return [{key: group[key] for key in CONFIGURED_HYPERPARAMETERS if key in group} for group in optimizer.param_groups]


def reapply_hyperparameters(scheduler, configured: list[dict]) -> None:
    """After loading a checkpoint, whose optimizer and schedule carry the saved run's hyperparameters and peak learning
    rates: the `configured` ones again, and every group's learning rate at the restored step from the (new) schedule.

    Unchanged values give back exactly what was loaded; changed ones (a new optimizer.lr, say) take effect at once.
    """
    groups = scheduler.optimizer.param_groups
    for group, values in zip(groups, configured):
        group.update(values)
    scheduler.base_lrs = [group["initial_lr"] for group in groups]
    for group, base_lr, multiplier in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
