"""Noisy top-k selection and the router z-loss: noise only in training, from no generator, losses by hand."""

from __future__ import annotations

import math

import pytest
import torch
from adapters.test_initialisation import RandomDraws
from adapters.test_layer import make_layer, reference_gates

from moelora_ds.adapters.layer import route
from moelora_ds.adapters.routing_noise import routing_noise, set_routing_noise_key


def test_noise_is_a_function_of_seed_key_and_position():
    a = routing_noise((1000, 4), seed=7, key=3, device=torch.device("cpu"))
    torch.testing.assert_close(a, routing_noise((1000, 4), seed=7, key=3, device=torch.device("cpu")), rtol=0, atol=0)
    assert not torch.equal(a, routing_noise((1000, 4), seed=7, key=4, device=torch.device("cpu")))
    assert not torch.equal(a, routing_noise((1000, 4), seed=8, key=3, device=torch.device("cpu")))
    # a longer batch extends the same sequence: position i's value does not depend on the batch's length
    torch.testing.assert_close(routing_noise((500, 4), seed=7, key=3, device=torch.device("cpu")), a[:500], rtol=0,
                               atol=0)


def test_noise_is_standard_normal():
    values = routing_noise((50_000, 4), seed=1, key=0, device=torch.device("cpu")).double().flatten()
    n = values.numel()
    # 200,000 draws: the sample mean's standard error is 1/sqrt(n) = 0.0022, the variance's sqrt(2/n) = 0.0032;
    # 5 standard errors. Normal tails: P(|z| > 2) = 4.55%, its standard error 0.047%
    assert abs(float(values.mean())) < 5 / math.sqrt(n)
    assert abs(float(values.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((values.abs() > 2).double().mean()) - 0.0455) < 5 * math.sqrt(0.0455 * 0.9545 / n)
    assert torch.isfinite(values).all()


def test_noise_draws_from_no_generator():
    layer = make_layer(top_k=2, router_noise=1.0).train()
    x = torch.randn(6, 12, dtype=torch.float64)
    state = torch.get_rng_state()
    with RandomDraws() as recorded:
        layer(x)
    assert recorded.draws == []
    assert torch.equal(torch.get_rng_state(), state)


def test_noise_only_in_training_and_only_in_the_choice():
    layer = make_layer(top_k=2, router_noise=2.0)
    x = torch.randn(400, 12, dtype=torch.float64)
    clean = reference_gates(x, layer.router.weight.detach(), 2)
    logits = layer.router(x)
    torch.testing.assert_close(route(logits, 2)[0], clean, rtol=1e-12, atol=1e-12)
    layer.eval()
    gates = {}
    layer.routing_stats = lambda g, p: gates.setdefault("eval", g)
    layer(x)
    torch.testing.assert_close(gates["eval"], clean, rtol=1e-12, atol=1e-12)
    layer.train()
    layer.routing_stats = lambda g, p: gates.setdefault("train", (g, p))
    layer(x)
    noisy, probs = gates["train"]
    chosen = noisy > 0
    assert (chosen.sum(-1) == 2).all()
    assert (chosen != (clean > 0)).any(dim=-1).double().mean() > 0.1  # std 2 noise on logits of spread ~1
    # the gates are the noise-free probabilities of the chosen experts, renormalised
    expected = probs * chosen / (probs * chosen).sum(-1, keepdim=True)
    torch.testing.assert_close(noisy, expected, rtol=1e-12, atol=1e-12)


def test_keyed_noise_repeats_for_a_recomputed_forward():
    layer = make_layer(top_k=2, router_noise=1.0).train()
    x = torch.randn(64, 12, dtype=torch.float64)
    set_routing_noise_key(layer, 5)
    first, again = layer(x), layer(x)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    set_routing_noise_key(layer, 6)
    assert not torch.equal(layer(x), first)


def test_unkeyed_noise_changes_every_training_forward():
    layer = make_layer(top_k=2, router_noise=1.0).train()
    x = torch.randn(64, 12, dtype=torch.float64)
    assert not torch.equal(layer(x), layer(x))


def test_z_loss_by_hand():
    layer = make_layer(num_experts=2, top_k=None, router_z_loss_coef=0.1, router_aux_loss_coef=0.0).train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[1, 0] = math.log(3.0)
    x = torch.zeros(2, 12, dtype=torch.float64)
    x[0, 0] = 1.0  # logits (0, ln 3): logsumexp = ln 4; token 2: logits (0, 0): ln 2
    layer(x)
    expected = 0.1 * (math.log(4.0) ** 2 + math.log(2.0) ** 2) / 2
    assert layer.aux_loss.item() == pytest.approx(expected, rel=1e-12)
    layer.aux_loss.backward()
    assert layer.router.weight.grad[1, 0] > 0 and layer.lora_A.grad is None
    layer.eval()
    layer(x)
    assert layer.aux_loss is None


def test_z_loss_adds_to_load_balancing():
    both = make_layer(top_k=2, router_z_loss_coef=0.1, router_aux_loss_coef=0.05).train()
    x = torch.randn(9, 12, dtype=torch.float64)
    both(x)
    balance = make_layer(top_k=2, router_aux_loss_coef=0.05).train()
    z = make_layer(top_k=2, router_z_loss_coef=0.1, router_aux_loss_coef=0.0).train()
    balance(x), z(x)
    torch.testing.assert_close(both.aux_loss, balance.aux_loss + z.aux_loss, rtol=1e-12, atol=0)
