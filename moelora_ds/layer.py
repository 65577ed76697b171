"""The MoE-LoRA linear layer: a frozen base linear plus E routed low-rank experts, computed stacked."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .moelora_config import MoELoRAConfig
from .preconditioner import precondition_factors


def full_shape(param: torch.Tensor) -> torch.Size:
    """The real shape of a parameter, also when ZeRO-3 has partitioned it to 0 elements."""
    return getattr(param, "ds_shape", param.shape)


def route(logits: torch.Tensor, top_k: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates (softmax, then top-k mask and renormalisation) and the dense softmax probabilities, in fp32 or better."""
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    if top_k is None:
        return probs, probs
    kept, index = probs.topk(top_k, dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, index, kept / kept.sum(dim=-1, keepdim=True))
    return gates, probs


def load_balancing_loss(gates: torch.Tensor, probs: torch.Tensor, coef: float) -> torch.Tensor:
    """coef * E * sum_e f_e * P_e with f_e the share of routed slots and P_e the mean router probability."""
    num_experts = gates.shape[-1]
    routed = (gates > 0).to(probs.dtype)
    share = routed.sum(0) / routed.sum().clamp_min(1.0)
    return coef * num_experts * (share * probs.mean(0)).sum()


class _ExpertUpProjection(torch.autograd.Function):
    """y = sum_e B_e v_e, with B's gradient taken against `v_for_weight_grad` instead of v.

    This is what lets the square-root gate rescaling live in rank space: v carries the gate values,
    `v_for_weight_grad` the sqrt(gate)-weighted activations the expert factors should learn from.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, v_for_weight_grad: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v_for_weight_grad, lora_B)
        return torch.einsum("ner,eor->no", v, lora_B)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        v_for_weight_grad, lora_B = ctx.saved_tensors
        grad_v = torch.einsum("no,eor->ner", grad_out, lora_B)
        grad_B = torch.einsum("no,ner->eor", grad_out, v_for_weight_grad)
        return grad_v, None, grad_B


class MoELoRALinear(nn.Module):
    """`y = W0 x + b + (alpha/r) * sum_e g_e(x) B_e A_e dropout(x)` with a softmax (top-k) router.

    Takes over the base linear's own `weight` and `bias` Parameters (frozen), so the base model's
    parameter names are unchanged; adds `lora_A` (E, r, in), `lora_B` (E, out, r), `router.weight` (E, in).
    """

    def __init__(self, base: nn.Linear, config: MoELoRAConfig) -> None:
        super().__init__()
        self.out_features, self.in_features = full_shape(base.weight)
        self.num_experts, self.rank = config.num_experts, config.rank
        self.scaling = config.scaling
        self.top_k = config.routed_top_k
        self.gate_rescale = config.gate_rescale
        self.aux_loss_coef = config.router_aux_loss_coef
        self.riemannian_reg: Optional[float] = None
        """Damping delta of the Riemannian preconditioner; None leaves expert gradients as they are."""
        self.aux_loss: Optional[torch.Tensor] = None
        """Load-balancing loss of the last training forward (None when the coefficient is 0)."""

        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.num_experts, self.rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.num_experts, self.out_features, self.rank, **factory))
        self.router = nn.Linear(self.in_features, self.num_experts, bias=False, **factory)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_adapter_parameters()

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """Every A_e drawn independently (Kaiming-uniform as in LoRA), B = 0, router as nn.Linear."""
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_A.uniform_(-bound, bound)
        self.lora_B.zero_()
        self.router.weight.uniform_(-bound, bound)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters, by their name relative to this layer."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "router.weight": self.router.weight}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = F.linear(x, self.weight, self.bias)
        tokens = x.reshape(-1, self.in_features)
        gates, probs = route(self.router(tokens), self.top_k)
        self.aux_loss = (load_balancing_loss(gates, probs, self.aux_loss_coef)
                         if self.aux_loss_coef > 0 and self.training else None)

        lora_A, lora_B = self.lora_A, self.lora_B
        if self.riemannian_reg is not None and torch.is_grad_enabled():
            lora_A, lora_B = precondition_factors(lora_A, lora_B, self.riemannian_reg)
        h = (self.dropout(tokens) @ lora_A.reshape(-1, self.in_features).t()).view(-1, self.num_experts, self.rank)
        gates = gates.to(h.dtype).unsqueeze(-1)
        if self.gate_rescale == "sqrt":
            sqrt_gates = gates.detach().sqrt()
            v = sqrt_gates * h + (gates - sqrt_gates) * h.detach()
            v_for_weight_grad = (sqrt_gates * h).detach()
        else:
            v = gates * h
            v_for_weight_grad = v.detach()
        lora_out = _ExpertUpProjection.apply(v, v_for_weight_grad, lora_B)
        return base_out + self.scaling * lora_out.view(*x.shape[:-1], self.out_features).to(base_out.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, rank={self.rank}, "
                f"top_k={self.top_k}, gate_rescale={self.gate_rescale}")
