"""Router-only gradient-norm clipping (the paper clips the gates' gradient alone), exact at every ZeRO stage."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from moelora_ds.adapters.optimizer import ROUTERS


def group_grad_norm(grads: list[torch.Tensor], *, partitioned: bool, device: Optional[torch.device]) -> torch.Tensor:
    """The 2-norm of `grads` (fp64 scalar on `device`, None: the first gradient's); `partitioned`: each rank holds
    a slice, so the squares are summed over ranks."""
    if device is None:
        device = grads[0].device if grads else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for grad in grads:
        norm = torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, torch.float32))
        squares += norm.to(device, torch.float64).square()
    if partitioned and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(squares)
    return squares.sqrt()


def clip_router_gradients(optimizer: torch.optim.Optimizer, max_norm: float, *, partitioned: bool = False,
                          device: Optional[torch.device] = None):
    """Before every `optimizer.step()`, scale the routers group's gradient to norm <= max_norm, as
    `torch.nn.utils.clip_grad_norm_` does (coefficient max_norm / (norm + 1e-6), at most 1).

    `optimizer` is the torch optimizer DeepSpeed steps. At ZeRO stages 1-3 it holds flat fp32 partitions,
    one slice per rank, and steps one parameter group per call (`partitioned=True`: the norm is all-reduced
    on `device`, the accelerator the process group communicates on; every rank steps the same groups in
    the same order, so the collective matches); at stage 0 the gradients are whole and already averaged.
    It runs after DeepSpeed's global clip (train.grad_clip). Returns the hook handle.
    """
    def hook(opt: torch.optim.Optimizer, args, kwargs) -> None:
        for group in opt.param_groups:
            if group.get("name") != ROUTERS or not group["params"]:
                continue
            grads = [p.grad for p in group["params"] if p.grad is not None]
            norm = group_grad_norm(grads, partitioned=partitioned, device=device)
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for grad in grads:
                grad.mul_(coef.to(grad.device, grad.dtype))

    return optimizer.register_step_pre_hook(hook)
