"""Non-finite losses, gradients and parameters: agreed on by every rank, the step discarded whole or the run stopped.

What `train.nonfinite=skip` discards is the *whole optimizer step*, never a micro-batch of it: a
non-finite loss is back-propagated like any other, so the step's accumulated gradient is non-finite on
every rank, and the step is then dropped as a unit:
- under ZeRO stages 1-3 and DeepSpeed's bf16 optimizer, DeepSpeed itself discards a step whose global
  gradient norm is not finite (the same path as an fp16 overflow: no optimizer update, gradients
  cleared, `engine.was_step_applied()` is False), so its micro-step counters and ZeRO-3's gradient
  hooks stay exactly as in a normal step;
- under ZeRO stage 0 with fp32 the optimizer is the plain torch one, which DeepSpeed does not guard:
  `discard_nonfinite_gradients` finds the non-finite gradient before `engine.step()` and drops every
  trainable parameter's `.grad`, so the torch optimizer updates nothing (moments and step counts included).
A skipped step still consumes its data and its place in the learning-rate schedule. A non-finite
gradient with a finite loss is discarded (or stops the run) the same way. Should an update ever be
applied although it was non-finite, or an update overflow the parameters, `check_finite_state` stops
the run whatever the policy, and `checkpoint.save_checkpoint` refuses to write a non-finite state.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.distributed as dist

from moelora_ds.adapters.inject import adapter_parameters
from moelora_ds.distributed.process_group import all_sum


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient or parameter; raised on every rank, the message names the step."""


def _local_partition(param: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter: its ZeRO-3 partition (`ds_tensor`), else the parameter itself."""
    return getattr(param, "ds_tensor", param).detach()


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO / bf16 wrapper (the engine's own one at stage 0)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def local_state(engine) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for this rank's share of the adapters and of the optimizer's parameters and state."""
    for name, param in adapter_parameters(engine.module).items():
        yield name, _local_partition(param)
    optimizer = _base_optimizer(engine)
    for group_index, group in enumerate(optimizer.param_groups):
        for param_index, param in enumerate(group["params"]):
            yield f"optimizer group {group_index} parameter {param_index}", param.detach()
    for state_index, state in enumerate(optimizer.state.values()):
        for key, value in state.items():
            if torch.is_tensor(value):
                yield f"optimizer state {state_index}.{key}", value.detach()


def nonfinite_names(tensors: Iterator[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [name for name, tensor in tensors
            if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all())]


def _ranks_with(flag: bool, device: torch.device) -> int:
    """How many ranks raised `flag` (an all-reduce every rank must join)."""
    return int(all_sum([float(flag)], device)[0])


def check_finite_state(engine, device: torch.device, what: str) -> None:
    """Raise NonFiniteError on every rank if any rank's adapters or optimizer state hold a non-finite value."""
    bad = nonfinite_names(local_state(engine))
    ranks = _ranks_with(bool(bad), device)
    if ranks:
        mine = f"; on this rank (rank {dist.get_rank()}): {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}" \
            if bad else ""
        raise NonFiniteError(f"{what}: the adapters or the optimizer state are not finite on {ranks} of "
                             f"{dist.get_world_size()} rank(s){mine}")


def discard_nonfinite_gradients(engine, device: torch.device) -> bool:
    """At stage 0 (plain torch optimizer), before the boundary `engine.step()`: drop a non-finite step's gradients.

    Returns whether the gradients were dropped (the same on every rank). At ZeRO stages 1-3 and with
    DeepSpeed's bf16 optimizer, DeepSpeed discards such a step itself, and this returns False.
    """
    if engine.zero_optimization_stage() > 0 or _base_optimizer(engine) is not engine.optimizer:
        return False
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    bad = any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in trainable)
    if not _ranks_with(bad, device):
        return False
    for param in trainable:
        param.grad = None
    return True


class StepGuard:
    """Tracks one optimizer step's non-finite events and applies `train.nonfinite` (stop | skip) to them."""

    def __init__(self, policy: str, step: int) -> None:
        self.policy, self.step = policy, step
        self.nonfinite_loss = False

    def loss(self, micro: int, micro_batches: int, nonfinite_ranks: int, world_size: int) -> None:
        """After a micro-batch's all-reduced loss check: stop now, or remember that the step must be discarded."""
        if not nonfinite_ranks:
            return
        self.nonfinite_loss = True
        if self.policy == "stop":
            raise NonFiniteError(f"non-finite loss at step {self.step} (micro-batch {micro + 1} of {micro_batches}) "
                                 f"on {nonfinite_ranks} of {world_size} rank(s); nothing of this step was applied. "
                                 f"Set train.nonfinite=skip to discard such steps and go on")

    def outcome(self, applied: bool, grads_dropped: bool, grad_norm: float | None, fp16: bool,
                step_scheduler: Callable[[], None]) -> str | None:
        """After the boundary `engine.step()`: None for a normal step, else why the step was skipped.

        Under fp16 a discarded step with a finite loss is DeepSpeed's loss scaler at work, not a fault.
        """
        if applied and not grads_dropped:
            if self.nonfinite_loss:
                raise NonFiniteError(f"step {self.step}: the loss was not finite but DeepSpeed applied the update "
                                     f"(is zero_optimization.compute_grad_norm false?); the adapters are no longer "
                                     f"trustworthy: resume from the last checkpoint")
            return None
        loss_scaler_overflow = fp16 and not self.nonfinite_loss
        if self.nonfinite_loss:
            reason = "non-finite loss"
        elif loss_scaler_overflow:
            reason = "fp16 overflow (loss scale lowered)"
        else:
            reason = f"non-finite gradient (global norm {grad_norm})"
        if self.policy == "stop" and not loss_scaler_overflow:
            raise NonFiniteError(f"{reason} at step {self.step}; the update was discarded. Set train.nonfinite=skip "
                                 f"to discard such steps and go on")
        if not applied:  # DeepSpeed's overflow path does not advance the schedule; keep lr a function of the step
            step_scheduler()
        return reason
