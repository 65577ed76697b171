"""The optimizer and learning-rate schedule a run's configuration names."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from moelora_ds.adapters.adamw import AdamWNoBiasCorrection
from moelora_ds.adapters.optimizer import adapter_param_groups, create_riemannian_optimizer, set_preconditioning
from moelora_ds.config import OptimizerConfig, SchedulerConfig
from moelora_ds.router_clip import clip_router_gradients


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


def lr_multiplier(config: SchedulerConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up from 0, then constant / linear / cosine decay to min_lr_ratio at the last step."""
    warmup, floor = config.warmup_steps, config.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
        if config.name == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def scheduler_factory(config: SchedulerConfig, total_steps: int):
    """A callable DeepSpeed builds the scheduler with, on the optimizer it wraps."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config, total_steps))


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
