"""Routing statistics of MoE-LoRA layers: routed slots per expert, router entropy and confidence, summed on device.

Every adapted layer owns one row of a (layers, 3E + 1) fp32 buffer, sums over the tokens it routed, added in its
own forward (no per-token tensor outlives the layer's forward, none is stacked across layers): per expert
the routed slots (top-k: 1 for each chosen expert whose gate is non-zero, as the load-balancing loss counts
them; dense routing: the expert's gate, so each token adds 1 in all), per expert the entropy terms -p log p of
the router probabilities, per expert the tokens whose probability for it exceeds CONFIDENT_PROBABILITY (at
most one expert per token), and the number of tokens. Rows are sums, so they add across micro-batches and
ranks; shares and means are taken only when reading them (`routing_summary`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from moelora_ds.adapters.inject import moelora_layers

CONFIDENT_PROBABILITY = 0.9
"""A token is confidently routed when its largest router (softmax) probability exceeds this."""


def routing_sums(gates: torch.Tensor, probs: torch.Tensor, top_k: Optional[int],
                 weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows (..., 3E + 1) of sums over the tokens of `gates` and `probs` (..., tokens, E), any leading dimensions
    (layers); `top_k` None is dense routing, `weight` (tokens,) of 0/1 leaves tokens out (padding).

    The entropy and the confidence are those of the dense router probabilities: with top-1 the renormalised
    gate is always 1. Each part is one product `weight @ part` ((tokens, E) at a time, no concatenated copy).
    """
    probs = probs.detach()
    weight = probs.new_ones(probs.shape[-2]) if weight is None else weight.to(probs)
    slots = (gates.detach() > 0).to(probs) if top_k is not None else gates.detach().to(probs)
    parts = [torch.matmul(weight, part) for part in
             (slots, torch.special.entr(probs), (probs > CONFIDENT_PROBABILITY).to(probs))]
    counted = weight.sum().expand(*probs.shape[:-2], 1)
    return torch.cat([*parts, counted], dim=-1)


class RoutingStats:
    """The summed statistics of named layers since the last `reset`, in one (layers, 3E + 1) fp32 buffer `sums`.

    Layers add their routing only inside `recording()`, each layer once per `recording()` (evaluation forwards
    outside it, and the forward that gradient checkpointing recomputes in backward, are not counted), as it
    happens: a few small device operations per layer, no host synchronisation. fp32 counts are exact up to 2^24
    tokens per interval.
    """

    def __init__(self, names: Sequence[str], num_experts: int, device: torch.device) -> None:
        self.names = list(names)
        self.num_experts = num_experts
        self.sums = torch.zeros(len(self.names), 3 * num_experts + 1, dtype=torch.float32, device=device)
        self._passes = 0
        self._current = 0
        """Number of the recording in progress; 0 outside `recording()`."""
        self._weight: Optional[torch.Tensor] = None
        self._seen = [0] * len(self.names)

    @contextmanager
    def recording(self, attention_mask: Optional[torch.Tensor] = None) -> Iterator[None]:
        """Count the forward pass run inside; tokens where `attention_mask` (batch, seq) is 0 are left out."""
        self._passes += 1
        self._current = self._passes
        self._weight = None if attention_mask is None else attention_mask.reshape(-1).to(self.sums)
        try:
            yield
        finally:
            self._current, self._weight = 0, None

    @property
    def active(self) -> bool:
        """Whether a `recording()` is in progress."""
        return self._current != 0

    def record(self, index: int, gates: torch.Tensor, probs: torch.Tensor, top_k: Optional[int]) -> None:
        """Add layer `index`'s routing of the forward pass being recorded to its row of `sums`."""
        if self._current == 0 or self._seen[index] == self._current:
            return
        self._seen[index] = self._current
        weight = self._weight
        if weight is not None and weight.numel() != gates.shape[-2]:
            weight = None  # a layer that does not see the batch's (batch x seq) tokens: count all it sees
        with torch.no_grad():
            self.sums[index].add_(routing_sums(gates, probs, top_k, weight))

    def reset(self) -> None:
        self.sums.zero_()


def attach_routing_stats(model: nn.Module, device: torch.device) -> Optional[RoutingStats]:
    """Statistics for every MoELoRALinear of `model`, which then records its routing into them; None if it has none."""
    layers = list(moelora_layers(model))
    if not layers:
        return None
    stats = RoutingStats([name for name, _ in layers], layers[0][1].num_experts, device)
    for index, (_, layer) in enumerate(layers):
        layer.routing_stats = _LayerRecorder(stats, index, layer.top_k)
    return stats


class _LayerRecorder:
    """What a MoELoRALinear calls with its gates and probabilities: `stats.record` for its own row."""

    def __init__(self, stats: RoutingStats, index: int, top_k: Optional[int]) -> None:
        self.stats, self.index, self.top_k = stats, index, top_k

    def __call__(self, gates: torch.Tensor, probs: torch.Tensor) -> None:
        self.stats.record(self.index, gates, probs, self.top_k)


def routing_summary(sums: torch.Tensor, dead_share: float) -> dict[str, torch.Tensor]:
    """Per-layer figures (fp64, on the host) from summed rows (layers, 3E + 1).

    share (layers, E): each expert's fraction of the routed slots (sums to 1 per layer); load (layers, E):
    the fraction of tokens routed to it (dense: its mean gate); entropy (layers,): mean router entropy in nats
    (at most ln E); confident (layers,): fraction of confidently routed tokens; dead (layers,): experts whose
    share is below `dead_share`; tokens (layers,). Layers without tokens give NaN figures and no dead experts.
    """
    sums = sums.detach().double().cpu()
    experts = (sums.shape[1] - 1) // 3
    slots, tokens = sums[:, :experts], sums[:, 3 * experts]
    share = slots / slots.sum(1, keepdim=True)
    return {"share": share, "load": slots / tokens.unsqueeze(1),
            "entropy": sums[:, experts:2 * experts].sum(1) / tokens,
            "confident": sums[:, 2 * experts:3 * experts].sum(1) / tokens, "dead": (share < dead_share).sum(1),
            "tokens": tokens}
