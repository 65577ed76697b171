"""The step's global gradient norm before clipping (metrics.jsonl's `grad_norm`), read without a host wait of its own.

DeepSpeed's optimizers (ZeRO stages 1-3, bf16, fp16) keep it: `engine.get_global_grad_norm()` after the
step, the norm of the averaged gradient over all ranks before clipping (null where ZeRO's
`compute_grad_norm` is off). At stage 0 with the plain torch optimizer DeepSpeed keeps none, so it is taken
here from the accumulated gradient before `engine.step()` (which clips and then clears it); DeepSpeed has
all-reduced that gradient in the boundary backward, so every rank holds the same one. Either way the norm
stays a device scalar until the step's existing all-reduce (`check_finite_state`) brings it to the host:
only rank 0's share is non-zero, so the sum over ranks is the norm itself.
"""

from __future__ import annotations

from typing import Optional

import torch

from moelora_ds.training.nonfinite import wrapped_by_deepspeed


def own_grad_norm(engine) -> Optional[torch.Tensor]:
    """Before the boundary `engine.step()`: the norm of the accumulated gradient (a device scalar) where DeepSpeed keeps
    none (stage 0, plain torch optimizer), else None."""
    if wrapped_by_deepspeed(engine):
        return None
    grads = [p.grad for p in engine.module.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([n.double() for n in torch._foreach_norm(grads)]))


def grad_norm_share(engine, own: Optional[torch.Tensor], rank: int) -> Optional[torch.Tensor | float]:
    """After the step: this rank's share of the step's norm for the all-reduce (the norm on rank 0, 0.0 elsewhere), or
    None on every rank when nobody computed one."""
    norm = own if own is not None else engine.get_global_grad_norm()
    if norm is None:
        return None
    return norm if rank == 0 else 0.0
