"""Riemannian preconditioning of the expert factors, applied to gradients inside backward.

For every expert e with damping delta:  grad_A <- (B^T B + delta I)^-1 grad_A,
grad_B <- grad_B (A A^T + delta I)^-1  (docs/METHOD.md section 2). It acts on each rank's local gradient
before DeepSpeed reduces or partitions it, which is exact because the map is linear in the gradient
and its r x r Gram matrices come from parameters identical on every rank (docs/METHOD.md section 3).
"""

from __future__ import annotations

import torch


def damped_gram(factor: torch.Tensor, reg: float, *, contract_rows: bool) -> torch.Tensor:
    """Per-expert r x r Gram matrix plus delta I, in float64: B^T B for B (E, out, r), A A^T for A (E, r, in).

    float64 keeps the damped Gram positive definite for any delta > 0 the config allows (in fp32 its rounding,
    ~1e-7 of |B|^2, can exceed a delta of 1e-6), so its inverse needs no fallback and no check."""
    f = factor.detach().double()
    gram = f.transpose(1, 2) @ f if contract_rows else f @ f.transpose(1, 2)
    return gram + reg * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)


def inverse_spd(matrix: torch.Tensor) -> torch.Tensor:
    """Batched inverse of small float64 matrices, without reading anything back to the host.

    `torch.linalg.inv` (and a Cholesky with a fallback) checks its `info` on the host: on an accelerator
    that waits for the device in every adapted layer's backward. `inv_ex` leaves `info` unread; the damped
    Grams are well inside float64's range of invertible matrices."""
    return torch.linalg.inv_ex(matrix)[0]


def precondition_gradients(grad_A: torch.Tensor, grad_B: torch.Tensor, gram_B: torch.Tensor,
                           gram_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply (B^T B + dI)^-1 on the left of grad_A (E, r, in) and (A A^T + dI)^-1 on the right of grad_B (E, out, r).

    The r x r inverses are taken in float64 and applied in the gradient's precision (fp32 at least)."""
    dtype = torch.promote_types(grad_A.dtype, torch.float32)
    new_A = inverse_spd(gram_B).to(dtype) @ grad_A.to(dtype)
    new_B = grad_B.to(dtype) @ inverse_spd(gram_A).to(dtype)
    return new_A.to(grad_A.dtype), new_B.to(grad_B.dtype)


class _PreconditionFactors(torch.autograd.Function):
    """Identity on (A, B) whose backward preconditions their gradients with Grams of the forward-time values."""

    @staticmethod
    def forward(ctx, lora_A: torch.Tensor, lora_B: torch.Tensor, reg: float):
        ctx.save_for_backward(damped_gram(lora_B, reg, contract_rows=True),
                              damped_gram(lora_A, reg, contract_rows=False))
        return lora_A.view_as(lora_A), lora_B.view_as(lora_B)

    @staticmethod
    def backward(ctx, grad_A: torch.Tensor, grad_B: torch.Tensor):
        gram_B, gram_A = ctx.saved_tensors
        grad_A, grad_B = precondition_gradients(grad_A, grad_B, gram_B, gram_A)
        return grad_A, grad_B, None


def precondition_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) unchanged in value; gradients flowing back through them are Riemannian-preconditioned."""
    return _PreconditionFactors.apply(lora_A, lora_B, reg)
