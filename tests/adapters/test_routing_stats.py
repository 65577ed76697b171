"""Routing statistics against hand-computed examples (top-k and dense), recorded by a real MoELoRALinear."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.inject import inject_moelora
from moelora_ds.adapters.layer import MoELoRALinear, route
from moelora_ds.adapters.routing_stats import RoutingStats, attach_routing_stats, routing_summary, routing_sums

# Three tokens' router probabilities over three experts; top-2 keeps {0, 1}, {0, 1} and {0, 2}.
PROBS = torch.tensor([[0.5, 0.3, 0.2], [0.95, 0.03, 0.02], [0.15, 0.05, 0.8]])


def entropy_terms(rows) -> list[float]:
    """Per expert, the sum over `rows` of -p log p."""
    return [sum(-row[e] * math.log(row[e]) for row in rows) for e in range(3)]


def test_top_k_sums_count_the_chosen_slots():
    gates, probs = route(PROBS.log(), 2)
    sums = routing_sums(gates, probs, top_k=2)
    # slots; entropy terms; tokens with a probability > 0.9 (token 1, expert 0); tokens
    want = [3, 2, 1, *entropy_terms(PROBS.tolist()), 1, 0, 0, 3]
    assert sums.tolist() == pytest.approx(want, rel=1e-6)


def test_dense_sums_add_the_gates():
    gates, probs = route(PROBS.log(), None)
    sums = routing_sums(gates, probs, top_k=None)
    want = [0.5 + 0.95 + 0.15, 0.3 + 0.03 + 0.05, 0.2 + 0.02 + 0.8, *entropy_terms(PROBS.tolist()), 1, 0, 0, 3]
    assert sums.tolist() == pytest.approx(want, rel=1e-6)


def test_weight_leaves_tokens_out():
    gates, probs = route(PROBS.log(), 2)
    sums = routing_sums(gates, probs, top_k=2, weight=torch.tensor([1, 0, 1]))
    want = [2, 1, 1, *entropy_terms([PROBS[0].tolist(), PROBS[2].tolist()]), 0, 0, 0, 2]
    assert sums.tolist() == pytest.approx(want, rel=1e-6)


def test_summary_shares_loads_entropy_and_dead_experts():
    top2 = [3, 2, 1, 0.6, 0.6, 0.6, 1, 0, 0, 3]
    dense = [1.6, 0.38, 1.02, 1.0, 0.5, 0.0, 0, 0, 0, 3]
    idle = [0] * 10
    summary = routing_summary(torch.tensor([top2, dense, idle]), dead_share=0.2)
    assert summary["share"][0].tolist() == pytest.approx([3 / 6, 2 / 6, 1 / 6])
    assert summary["load"][0].tolist() == pytest.approx([1, 2 / 3, 1 / 3])  # top-2: fraction of tokens per expert
    assert summary["share"][1].tolist() == pytest.approx([1.6 / 3, 0.38 / 3, 1.02 / 3])
    assert summary["share"][1].tolist() == pytest.approx(summary["load"][1].tolist())  # dense: both are the mean gate
    assert summary["entropy"][:2].tolist() == pytest.approx([0.6, 0.5])
    assert summary["confident"][:2].tolist() == pytest.approx([1 / 3, 0])
    assert summary["dead"].tolist() == [1, 1, 0]  # 1/6 and 0.127 are below 0.2; a layer without tokens has none
    assert summary["tokens"].tolist() == [3, 3, 0] and math.isnan(summary["entropy"][2])


def forced_layer(top_k) -> MoELoRALinear:
    """A 3-expert layer whose router logits are its input (identity router), so the input sets the probabilities."""
    layer = MoELoRALinear(nn.Linear(3, 5), MoELoRAConfig(num_experts=3, rank=2, top_k=top_k, dropout=0.0,
                                                         router_noise=0.0))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(3))
    return layer


@pytest.mark.parametrize("top_k", [2, None])
def test_layer_records_once_per_recording_and_skips_padding(top_k):
    layer = forced_layer(top_k)
    stats = RoutingStats(["layer"], 3, torch.device("cpu"))
    layer.routing_stats = lambda gates, probs: stats.record(0, gates, probs, layer.top_k)
    x = PROBS.log().unsqueeze(0).requires_grad_()  # (batch 1, seq 3, features 3)
    layer(x)  # outside a recording: not counted
    assert stats.sums.abs().sum() == 0
    with stats.recording(torch.tensor([[1, 0, 1]])):
        out = checkpoint(layer, x, use_reentrant=False)
        out.sum().backward()  # recomputes the forward: counted once all the same
        layer(x)
    gates, probs = route(PROBS.log(), layer.top_k)
    want = routing_sums(gates, probs, layer.top_k, torch.tensor([1, 0, 1]))
    torch.testing.assert_close(stats.sums[0], want)
    with stats.recording(None):
        layer(x)
    torch.testing.assert_close(stats.sums[0], want + routing_sums(gates, probs, layer.top_k))
    stats.reset()
    assert stats.sums.abs().sum() == 0


def test_attach_gives_every_layer_its_row():
    from conftest import build_tiny_model

    model = inject_moelora(build_tiny_model("llama"), MoELoRAConfig(num_experts=4, rank=2, top_k=1, dropout=0.0,
                                                                    target_modules=["q_proj", "v_proj"]))
    stats = attach_routing_stats(model, torch.device("cpu"))
    assert stats.names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    ids = torch.randint(0, 300, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad(), stats.recording(mask):
        model(input_ids=ids, attention_mask=mask)
    assert stats.sums[:, :4].sum(1).tolist() == [11.0] * 4  # top-1: one slot per counted token
    assert stats.sums[:, -1].tolist() == [11.0] * 4 and stats.sums.shape == (4, 3 * 4 + 1)
    assert attach_routing_stats(build_tiny_model("llama"), torch.device("cpu")) is None
