"""`MoELoRAConfig`: the adapter hyper-parameters, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Optional, Union

GateRescale = Literal["sqrt", "none"]


@dataclass
class MoELoRAConfig:
    """Mixture-of-LoRA-experts adapter configuration (see docs/METHOD.md section 1)."""

    num_experts: int = 4
    """E: experts per adapted layer."""
    rank: int = 8
    """r: rank of every expert."""
    alpha: float = 16.0
    """Output scaling is alpha / rank."""
    dropout: float = 0.05
    """Dropout applied to the expert input (not to the router input)."""
    dropout_per_expert: bool = False
    """A separate dropout mask for every expert (the paper's); false: one mask shared by all experts (per-expert
    masks keep E copies of the layer input for backward)."""
    top_k: Optional[int] = None
    """Experts kept per token; None (or num_experts) is dense routing."""
    target_modules: Union[str, list[str]] = "attention"
    """"attention" or "mlp" (the model family's names for that part of every layer: adapters/targets.py),
    "all-linear", module-name suffixes (a list), or a regex matched against the full module path (another string)."""
    gate_rescale: GateRescale = "sqrt"
    """"sqrt": expert gradients weighted by sqrt(gate) (the paper); "none": plain gating."""
    router_aux_loss_coef: float = 0.01
    """Coefficient of every layer's load-balancing loss coef * E * sum_e f_e * P_e (f_e: expert e's share of the routed
    slots, P_e: its mean router probability), added to the training loss; 0 turns it off. Without it the routers learn
    a preference all tokens share and a fifth of the experts never get a token (benchmarks/RESULTS.md, routing)."""
    router_z_loss_coef: float = 0.0
    """Coefficient of the router z-loss coef * mean(logsumexp(logits)^2); 0 turns it off."""
    router_noise: float = 0.0
    """Standard deviation of the Gaussian noise added to the router logits to choose the top-k experts while
    training (the gates keep the noise-free probabilities; evaluation and exports route without it), in logit units;
    0 turns it off, dense routing ignores it. 0.3 kept every expert chosen from the first step of the quickstart but
    delayed its learning on other seeds (README, "What the routers do")."""

    def __post_init__(self) -> None:
        def fail(key: str, expected: str) -> None:
            raise ValueError(f"moelora.{key}: expected {expected}, got {getattr(self, key)!r}")

        for key in ("num_experts", "rank"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(key, "a positive integer")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            fail("alpha", "a positive number")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            fail("dropout", "a number in [0, 1)")
        if not isinstance(self.dropout_per_expert, bool):
            fail("dropout_per_expert", "true or false")
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
                fail("top_k", "a positive integer or null")
            if self.top_k > self.num_experts:
                fail("top_k", f"at most num_experts={self.num_experts}")
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                fail("target_modules", "'attention', 'mlp', 'all-linear', a non-empty regex, or a list of names")
        elif not (isinstance(self.target_modules, (list, tuple)) and self.target_modules
                  and all(isinstance(t, str) and t for t in self.target_modules)):
            fail("target_modules", "'attention', 'mlp', 'all-linear', a regex, or a non-empty list of names")
        else:
            self.target_modules = list(self.target_modules)
        if self.gate_rescale not in ("sqrt", "none"):
            fail("gate_rescale", "'sqrt' or 'none'")
        for key in ("router_aux_loss_coef", "router_z_loss_coef", "router_noise"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                fail(key, "a non-negative number")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def routed_top_k(self) -> Optional[int]:
        """top_k when it actually drops experts, else None (dense)."""
        return self.top_k if self.top_k is not None and self.top_k < self.num_experts else None

    def to_dict(self) -> dict:
        return asdict(self)
