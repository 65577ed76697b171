"""Non-finite losses, gradients and parameters: agreed on by every rank, the step discarded whole or the run stopped.

What `train.nonfinite=skip` discards is the *whole optimizer step*, never a micro-batch of it: a
non-finite loss is back-propagated like any other, so the step's accumulated gradient is non-finite on
every rank, and the step is then dropped as a unit:
- under ZeRO stages 1-3 and DeepSpeed's bf16 optimizer, DeepSpeed itself discards a step whose global
  gradient norm is not finite (the same path as an fp16 overflow: no optimizer update, gradients
  cleared, `engine.was_step_applied()` is False), so its micro-step counters and ZeRO-3's gradient
  hooks stay exactly as in a normal step;
- under ZeRO stage 0 with fp32 the optimizer is the plain torch one, which DeepSpeed does not guard:
  `nonfinite_gradients` flags the non-finite gradient before `engine.step()` and `discard_gradients` drops
  every trainable parameter's `.grad`, so the torch optimizer updates nothing (moments and step counts included).
The losses' and gradients' finiteness is read once per step, in the all-reduce before the boundary
`engine.step()`, and the state's once after it: nothing here waits for the device per micro-batch or per tensor.
A skipped step still consumes its data and its place in the learning-rate schedule. A non-finite
gradient with a finite loss is discarded (or stops the run) the same way. Should an update ever be
applied although it was non-finite, or an update overflow the parameters, `check_finite_state` stops
the run whatever the policy, and `checkpoints.save_load.save_checkpoint` refuses to write a non-finite state.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Iterator, Sequence

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


def nonfinite_flags(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """1.0 for each tensor holding a NaN or an infinity, else 0.0 (float64, on `device`), read by nobody yet.

    One fused max-abs reduction (NaN-propagating) per device and dtype instead of a host read per tensor;
    empty and non-floating tensors count as finite."""
    flags = torch.zeros(len(tensors), dtype=torch.float64, device=device)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, tensor in enumerate(tensors):
        if tensor.is_floating_point() and tensor.numel():
            groups[(tensor.device, tensor.dtype)].append(index)
    for indices in groups.values():
        maxima = torch.stack(torch._foreach_norm([tensors[i] for i in indices], ord=math.inf))
        flags[torch.tensor(indices, device=device)] = (~torch.isfinite(maxima)).to(device, torch.float64)
    return flags


def check_finite_state(engine, device: torch.device, what: str, also_sum: Sequence = ()) -> list[float]:
    """Raise NonFiniteError on every rank if any rank's adapters or optimizer state hold a non-finite value.

    One fused reduction and one all-reduce, which also carries `also_sum` (numbers or device scalars): their
    sums over ranks are returned."""
    names, tensors = zip(*local_state(engine))
    flags = nonfinite_flags(tensors, device)
    ranks, *sums = all_sum([flags.amax(), *also_sum], device)
    if ranks:
        bad = [name for name, flag in zip(names, flags.tolist()) if flag]
        mine = f"; on this rank (rank {dist.get_rank()}): {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}" \
            if bad else ""
        raise NonFiniteError(f"{what}: the adapters or the optimizer state are not finite on {int(ranks)} of "
                             f"{dist.get_world_size()} rank(s){mine}")
    return sums


def wrapped_by_deepspeed(engine) -> bool:
    """Whether a DeepSpeed optimizer wraps the torch one (ZeRO stages 1-3, its bf16 and fp16 optimizers): it discards a
    step with non-finite gradients itself and keeps the step's global gradient norm."""
    return engine.zero_optimization_stage() > 0 or _base_optimizer(engine) is not engine.optimizer


def nonfinite_gradients(engine, device: torch.device) -> torch.Tensor | float:
    """At stage 0 with the plain torch optimizer: 1.0 (a device scalar) if this rank's accumulated gradient holds a
    NaN or an infinity, else 0.0. Elsewhere 0.0: DeepSpeed discards such a step itself."""
    if wrapped_by_deepspeed(engine):
        return 0.0
    grads = [p.grad for p in engine.module.parameters() if p.requires_grad and p.grad is not None]
    return nonfinite_flags(grads, device).amax() if grads else 0.0


def discard_gradients(engine) -> None:
    """Before the boundary `engine.step()` at stage 0: drop every trainable `.grad`, so the torch optimizer updates
    nothing (moments and step counts included)."""
    for param in engine.module.parameters():
        if param.requires_grad:
            param.grad = None


class StepGuard:
    """Tracks one optimizer step's non-finite events and applies `train.nonfinite` (stop | skip) to them."""

    def __init__(self, policy: str, step: int) -> None:
        self.policy, self.step = policy, step
        self.nonfinite_loss = False

    def losses(self, nonfinite_ranks: Sequence[float], world_size: int) -> None:
        """After the step's all-reduced loss check (how many ranks had a non-finite loss, per micro-batch), before its
        update: stop now, or remember that the step must be discarded."""
        for micro, ranks in enumerate(nonfinite_ranks):
            if not ranks:
                continue
            self.nonfinite_loss = True
            if self.policy == "stop":
                raise NonFiniteError(f"non-finite loss at step {self.step} (micro-batch {micro + 1} of "
                                     f"{len(nonfinite_ranks)}) on {int(ranks)} of {world_size} rank(s); nothing of "
                                     f"this step was applied. Set train.nonfinite=skip to discard such steps and go on")

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
