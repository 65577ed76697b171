"""The MoE-LoRA linear layer: a frozen base linear plus E routed low-rank experts, computed stacked."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.dropout import SeededDropout
from moelora_ds.adapters.preconditioner import precondition_factors
from moelora_ds.adapters.routing_noise import routing_noise


def full_shape(param: torch.Tensor) -> torch.Size:
    """The real shape of a parameter, also when ZeRO-3 has partitioned it to 0 elements."""
    return getattr(param, "ds_shape", param.shape)


def _softmax_over_experts(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension, computed along a transposed view of it (result contiguous).

    Same values; torch's CPU softmax over a short last dimension (a few experts) runs about 5-8x slower
    than over a strided one (measured on 1024 x 8 fp32, torch 2.13), forward and backward.
    """
    if logits.dim() < 2:
        return torch.softmax(logits, dim=-1)
    return torch.softmax(logits.transpose(-1, -2), dim=-2).transpose(-1, -2).contiguous()


def route(logits: torch.Tensor, top_k: Optional[int],
          noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates (softmax, then top-k mask and renormalisation) and the dense softmax probabilities, in fp32 or better.

    `noise` (same shape as `logits`) is added to the logits only to choose the top-k experts (noisy top-k
    selection); the gates are the noise-free probabilities of the chosen experts, renormalised."""
    probs = _softmax_over_experts(logits.to(torch.promote_types(logits.dtype, torch.float32)))
    if top_k is None:
        return probs, probs
    if noise is None:
        kept, index = probs.topk(top_k, dim=-1)
    else:
        index = (logits.to(probs.dtype) + noise.to(probs.dtype)).topk(top_k, dim=-1).indices
        kept = probs.gather(-1, index)
    gates = torch.zeros_like(probs).scatter(-1, index, kept / kept.sum(dim=-1, keepdim=True))
    return gates, probs


def load_balancing_loss(gates: torch.Tensor, probs: torch.Tensor, coef: float) -> torch.Tensor:
    """coef * E * sum_e f_e * P_e with f_e the share of routed slots and P_e the mean router probability."""
    num_experts = gates.shape[-1]
    routed = (gates > 0).to(probs.dtype)
    share = routed.sum(0) / routed.sum().clamp_min(1.0)
    return coef * num_experts * (share * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor, coef: float) -> torch.Tensor:
    """coef * mean over tokens of logsumexp(logits)^2 (ST-MoE's router z-loss), in fp32 or better."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return coef * torch.logsumexp(logits, dim=-1).square().mean()


class _RoutedExperts(torch.autograd.Function):
    """`base_out + s * sum_e g_e B_e h_e` for all experts at once, with the gate rescaling's gradients.

    h (tokens, E, r) is every expert's rank-space activation A_e dropout(x), gates (tokens, E) the routing
    weights, lora_B (E, out, r). The value is the plainly gated sum. Gradients (docs/METHOD.md section 1): with
    `sqrt_rescale`, h and B_e learn from sqrt(g_e) B_e h_e instead of g_e B_e h_e (the paper's
    `w_e = sqrt(g_e) out_e + (g_e - sqrt(g_e)) out_e.detach()`), while the gates get their plain gradient
    <grad, s B_e h_e>; without it, plain gating. Everything stays in rank space: the experts are one
    (tokens, E*r) x (E*r, out) product accumulated into the base output in place (addmm_, no
    (tokens, out) temporary), so `base_out` must be the base linear's own fresh output.
    """

    @staticmethod
    def forward(ctx, base_out: torch.Tensor, h: torch.Tensor, gates: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, sqrt_rescale: bool) -> torch.Tensor:
        tokens, num_experts, rank = h.shape
        out_features = lora_B.shape[1]
        # (E, out, r) -> (out, E*r): column e*r + j of B_cat is column j of B_e, matching h's (E, r) layout.
        B_cat = lora_B.permute(1, 0, 2).reshape(out_features, num_experts * rank).to(h.dtype)
        # The gates expanded to h's shape once: on CPU, products with a (tokens, E, 1) broadcast operand run
        # 3-7x slower than same-shape ones, and forward and backward need three of them.
        g = gates.to(h.dtype).unsqueeze(-1).expand(tokens, num_experts, rank).contiguous()
        weight = g.sqrt() if sqrt_rescale else g  # what h and B learn through (docs/METHOD.md section 1)
        ctx.save_for_backward(h, weight, B_cat)
        ctx.scaling, ctx.gates_dtype, ctx.B_dtype = scaling, gates.dtype, lora_B.dtype
        v = (g * h).view(tokens, num_experts * rank)
        if base_out.dtype == h.dtype and base_out.is_contiguous():
            base_out.view(tokens, out_features).addmm_(v, B_cat.t(), alpha=scaling)
            ctx.mark_dirty(base_out)
            return base_out
        return base_out + (scaling * (v @ B_cat.t())).view(base_out.shape).to(base_out.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight, B_cat = ctx.saved_tensors
        tokens, num_experts, rank = h.shape
        _, need_h, need_gates, need_B, _, _ = ctx.needs_input_grad
        grad_lora = grad_out.reshape(tokens, -1).to(h.dtype)
        grad_h = grad_gates = grad_B = None
        if need_h or need_gates:
            grad_v = (grad_lora @ B_cat).mul_(ctx.scaling).view(tokens, num_experts, rank)
            if need_h:
                grad_h = grad_v * weight
            if need_gates:
                grad_gates = (grad_v * h).sum(-1).to(ctx.gates_dtype)
        if need_B:
            grad_B_cat = (grad_lora.t() @ (weight * h).view(tokens, num_experts * rank)).mul_(ctx.scaling)
            grad_B = grad_B_cat.view(-1, num_experts, rank).permute(1, 0, 2).contiguous().to(ctx.B_dtype)
        return grad_out, grad_h, grad_gates, grad_B, None, None


class MoELoRALinear(nn.Module):
    """`y = W0 x + b + (alpha/r) * sum_e g_e(x) B_e A_e dropout(x)` with a softmax (top-k) router.

    Takes over the base linear's own `weight` and `bias` Parameters (frozen), so the base model's
    parameter names are unchanged; adds `lora_A` (E, r, in), `lora_B` (E, out, r), `router.weight` (E, in).
    `init_seed` alone decides their starting values (`reset_adapter_parameters`).
    """

    def __init__(self, base: nn.Linear, config: MoELoRAConfig, init_seed: int = 0) -> None:
        super().__init__()
        self.out_features, self.in_features = full_shape(base.weight)
        self.num_experts, self.rank = config.num_experts, config.rank
        self.scaling = config.scaling
        self.top_k = config.routed_top_k
        self.gate_rescale = config.gate_rescale
        routed = self.num_experts > 1  # one expert: its gate is always 1, there is nothing to balance
        self.aux_loss_coef = config.router_aux_loss_coef if routed else 0.0
        self.z_loss_coef = config.router_z_loss_coef if routed else 0.0
        self.router_noise = config.router_noise
        self.noise_seed = init_seed
        self.noise_key: Optional[int] = None
        """Key of the routing noise of the next training forward (routing_noise.py); None: a count of this layer's
        training forwards."""
        self._training_forwards = 0
        self.riemannian_reg: Optional[float] = None
        """Damping delta of the Riemannian preconditioner; None leaves expert gradients as they are."""
        self.aux_loss: Optional[torch.Tensor] = None
        """Router loss terms of the last training forward, load balancing and z-loss (None when both are off)."""
        self.routing_stats: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None
        """Called with (gates, probs) on every forward when set (adapters/routing_stats.py)."""

        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.num_experts, self.rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.num_experts, self.out_features, self.rank, **factory))
        self.router = skip_init(nn.Linear, self.in_features, self.num_experts, bias=False, **factory)
        self.dropout = SeededDropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.dropout_per_expert = config.dropout_per_expert
        self.reset_adapter_parameters(init_seed)

    @torch.no_grad()
    def reset_adapter_parameters(self, init_seed: int) -> None:
        """Every A_e drawn independently (Kaiming-uniform as in LoRA), B = 0, router as nn.Linear.

        Drawn in fp32 by a CPU generator seeded with `init_seed`, then moved to the base's device and dtype: the
        same starting adapters on every device, dtype, ZeRO stage and rank, and no draw from any other stream
        (dropout has its own: dropout.py)."""
        generator = torch.Generator(device="cpu").manual_seed(init_seed)
        bound = 1.0 / math.sqrt(self.in_features)
        for param in (self.lora_A, self.router.weight):
            drawn = torch.empty(param.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            param.copy_(drawn)
        self.lora_B.zero_()

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters, by their name relative to this layer."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "router.weight": self.router.weight}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = F.linear(x, self.weight, self.bias)
        tokens = x.reshape(-1, self.in_features)
        logits = self.router(tokens)
        gates, probs = route(logits, self.top_k, self._selection_noise(logits))
        self.aux_loss = self._router_losses(logits, gates, probs) if self.training else None
        if self.routing_stats is not None:
            self.routing_stats(gates, probs)

        lora_A, lora_B = self.lora_A, self.lora_B
        if self.riemannian_reg is not None and torch.is_grad_enabled():
            lora_A, lora_B = precondition_factors(lora_A, lora_B, self.riemannian_reg)
        h = self._rank_space(tokens, lora_A)
        return _RoutedExperts.apply(base_out, h, gates, lora_B, self.scaling, self.gate_rescale == "sqrt")

    def _selection_noise(self, logits: torch.Tensor) -> Optional[torch.Tensor]:
        """router_noise x standard normal noise for the top-k choice of a training forward, else None."""
        if not (self.training and self.top_k is not None and self.router_noise > 0):
            return None
        key = self.noise_key
        if key is None:
            self._training_forwards += 1
            key = self._training_forwards
        return routing_noise(tuple(logits.shape), self.noise_seed, key, logits.device).mul_(self.router_noise)

    def _router_losses(self, logits: torch.Tensor, gates: torch.Tensor, probs: torch.Tensor) -> Optional[torch.Tensor]:
        terms = []
        if self.aux_loss_coef > 0:
            terms.append(load_balancing_loss(gates, probs, self.aux_loss_coef))
        if self.z_loss_coef > 0:
            terms.append(router_z_loss(logits, self.z_loss_coef))
        return sum(terms) if terms else None

    def _rank_space(self, tokens: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
        """Every expert's A_e dropout(x), (tokens, E, r): one mask shared by all experts, or one per expert."""
        if self.dropout_per_expert and self.training and isinstance(self.dropout, SeededDropout):
            dropped = self.dropout(tokens.unsqueeze(0).expand(self.num_experts, -1, -1))  # (E, tokens, in)
            return torch.bmm(dropped, lora_A.transpose(1, 2)).transpose(0, 1).contiguous()
        return (self.dropout(tokens) @ lora_A.reshape(-1, self.in_features).t()).view(-1, self.num_experts, self.rank)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, rank={self.rank}, "
                f"top_k={self.top_k}, router_noise={self.router_noise}, "
                f"gate_rescale={self.gate_rescale}, dropout_per_expert={self.dropout_per_expert}")
