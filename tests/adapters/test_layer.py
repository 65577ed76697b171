"""MoELoRALinear against a plain per-expert reference written from docs/METHOD.md section 1."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.layer import MoELoRALinear, route

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 4e-2}


def make_layer(in_features: int = 12, out_features: int = 10, *, dtype: torch.dtype = torch.float64, seed: int = 0,
               bias: bool = True, **config) -> MoELoRALinear:
    """A MoE-LoRA layer over a random base linear, with random (non-zero) B so the experts contribute; no routing
    noise unless asked for (the references choose experts by the logits alone)."""
    torch.manual_seed(seed)
    config = {"num_experts": 4, "rank": 3, "alpha": 6.0, "dropout": 0.0, "router_noise": 0.0, **config}
    layer = MoELoRALinear(nn.Linear(in_features, out_features, bias=bias, dtype=dtype), MoELoRAConfig(**config))
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.5)
        layer.router.weight.normal_(0.0, 1.0)
    return layer


def reference_gates(x: torch.Tensor, router_weight: torch.Tensor, top_k: Optional[int]) -> torch.Tensor:
    """softmax(W_g x), then (top-k < E) keep the k largest, zero the rest, renormalise.

    The logits are computed in the router weight's dtype (as a model in that precision does), the rest in float64.
    """
    gates = torch.softmax(F.linear(x.to(router_weight.dtype), router_weight).double(), dim=-1)
    num_experts = gates.shape[-1]
    if top_k is not None and top_k < num_experts:
        mask = torch.zeros_like(gates).scatter(-1, gates.topk(top_k, dim=-1).indices, 1.0)
        gates = gates * mask / (gates * mask).sum(-1, keepdim=True)
    return gates


def reference_forward(x: torch.Tensor, weight, bias, lora_A, lora_B, router_weight, *, scaling: float,
                      top_k: Optional[int], rescale: str = "none",
                      expert_input: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = W0 x + b + s * sum_e w_e, a Python loop over experts, with w_e = g_e out_e or its sqrt(g) variant.

    `expert_input` is dropout(x) when the test supplies it, shaped like x or, one mask per expert, (..., E, in);
    the router always sees x.
    """
    gates = reference_gates(x, router_weight, top_k).to(lora_A.dtype)
    expert_input = x if expert_input is None else expert_input
    per_expert = expert_input.dim() == x.dim() + 1
    y = F.linear(x, weight, bias)
    for e in range(lora_A.shape[0]):
        out_e = (expert_input[..., e, :] if per_expert else expert_input) @ lora_A[e].t() @ lora_B[e].t()
        g_e = gates[..., e:e + 1]
        if rescale == "sqrt":
            sg = g_e.detach().sqrt()
            w_e = sg * out_e + (g_e - sg) * out_e.detach()
        else:
            w_e = g_e * out_e
        y = y + scaling * w_e
    return y


def reference_of(layer: MoELoRALinear, x: torch.Tensor, expert_input: Optional[torch.Tensor] = None,
                 **kwargs) -> torch.Tensor:
    """The reference in float64 on the layer's current parameter values; router logits in the layer's dtype."""
    cast = [None if p is None else p.detach().double() for p in (layer.weight, layer.bias, layer.lora_A, layer.lora_B)]
    return reference_forward(x.detach().double(), *cast, layer.router.weight.detach(), scaling=layer.scaling,
                             top_k=layer.top_k, expert_input=None if expert_input is None else expert_input.double(),
                             **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [None, 1, 2, 4])
@pytest.mark.parametrize("shape", [(7,), (2, 5), (2, 3, 4)], ids=["2d", "3d", "4d"])
def test_forward_matches_reference(dtype, top_k, shape):
    layer = make_layer(12, 10, dtype=dtype, top_k=top_k)
    x = torch.randn(*shape, 12, dtype=dtype)
    y = layer(x)
    assert y.shape == (*shape, 10) and y.dtype == dtype
    expected = reference_of(layer, x)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    # the experts really contribute: the output is not just the base linear
    assert (y.double() - F.linear(x, layer.weight, layer.bias).double()).abs().max() > 10 * tol


@pytest.mark.parametrize("in_features,out_features,bias", [(5, 17, True), (16, 3, False)])
def test_forward_other_shapes_and_no_bias(in_features, out_features, bias):
    layer = make_layer(in_features, out_features, bias=bias, num_experts=6, rank=2, top_k=3)
    x = torch.randn(3, 4, in_features, dtype=torch.float64)
    assert layer.lora_A.shape == (6, 2, in_features) and layer.lora_B.shape == (6, out_features, 2)
    assert layer.router.weight.shape == (6, in_features) and layer.router.bias is None
    torch.testing.assert_close(layer(x), reference_of(layer, x), rtol=1e-10, atol=1e-10)


def test_top_k_gates_are_sparse_and_renormalised():
    layer = make_layer(top_k=2)
    x = torch.randn(9, 12, dtype=torch.float64)
    captured = {}
    layer.router.register_forward_hook(lambda mod, inp, out: captured.setdefault("logits", out))
    layer(x)
    gates, probs = route(captured["logits"], layer.top_k)
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(9, dtype=gates.dtype))
    torch.testing.assert_close(probs, torch.softmax(captured["logits"], -1))
    torch.testing.assert_close(gates, reference_gates(x, layer.router.weight.detach(), 2))


@pytest.mark.parametrize("rescale", ["none", "sqrt"])
def test_single_expert_is_plain_lora(rescale):
    layer = make_layer(num_experts=1, rank=4, gate_rescale=rescale)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    A = layer.lora_A.detach()[0].clone().requires_grad_(True)
    B = layer.lora_B.detach()[0].clone().requires_grad_(True)
    expected = F.linear(x, layer.weight, layer.bias) + layer.scaling * (x @ A.t() @ B.t())
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad[0], A.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.lora_B.grad[0], B.grad, rtol=1e-12, atol=1e-12)


def test_init_B_zero_and_independent_experts():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(12, 10), MoELoRAConfig(num_experts=3, rank=2))
    assert torch.count_nonzero(layer.lora_B) == 0
    assert not torch.equal(layer.lora_A[0], layer.lora_A[1]) and not torch.equal(layer.lora_A[1], layer.lora_A[2])
    assert layer.lora_A.abs().max() <= 1 / 12 ** 0.5
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad and layer.router.weight.requires_grad
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


@pytest.mark.parametrize("per_expert", [False, True])
def test_dropout_has_no_effect_in_eval_mode(per_expert):
    layer = make_layer(dropout=0.5, top_k=2, dropout_per_expert=per_expert).eval()
    x = torch.randn(3, 4, 12, dtype=torch.float64)
    torch.manual_seed(1)
    first = layer(x)
    torch.manual_seed(2)
    torch.testing.assert_close(first, layer(x), rtol=0, atol=0)
    torch.testing.assert_close(first, reference_of(layer, x), rtol=1e-10, atol=1e-10)


def test_train_mode_dropout_reaches_experts_only():
    layer = make_layer(dropout=0.5, top_k=2).train()
    x = torch.randn(3, 4, 12, dtype=torch.float64)
    seen = {}
    layer.router.register_forward_hook(lambda mod, inp, out: seen.__setitem__("router", (inp[0], out)))
    layer.dropout.register_forward_hook(lambda mod, inp, out: seen.__setitem__("dropped", out))
    outputs, logits = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        outputs.append(layer(x))
        router_input, router_logits = seen["router"]
        dropped = seen["dropped"].view_as(x)
        # the router sees the undropped input; the experts see dropout(x)
        torch.testing.assert_close(router_input.view_as(x), x, rtol=0, atol=0)
        assert (dropped == 0).float().mean() > 0.2
        kept = dropped != 0
        torch.testing.assert_close(dropped[kept], x[kept] * 2)
        torch.testing.assert_close(outputs[-1], reference_of(layer, x, expert_input=dropped), rtol=1e-10, atol=1e-10)
        logits.append(router_logits)
    assert not torch.allclose(outputs[0], outputs[1])
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


@pytest.mark.parametrize("per_expert", [False, True])
def test_dropout_mask_per_expert_or_shared(per_expert):
    """dropout_per_expert: every expert sees its own mask, as in the paper's loop over experts (docs/METHOD.md
    section 1); otherwise one mask for all. Value and every gradient (A, B, router, x) match the per-expert
    reference fed the masks the layer drew."""
    p, experts = 0.5, 4
    layer = make_layer(dropout=p, top_k=2, gate_rescale="sqrt", dropout_per_expert=per_expert).train()
    x = torch.randn(3, 4, 12, dtype=torch.float64, requires_grad=True)
    seen = {}
    layer.dropout.register_forward_hook(lambda mod, inp, out: seen.__setitem__("dropped", out.detach()))
    upstream = torch.randn(3, 4, 10, dtype=torch.float64)
    torch.manual_seed(3)
    y = layer(x)
    (y * upstream).sum().backward()
    dropped = seen["dropped"]
    if per_expert:  # drawn as (E, tokens, in)
        assert dropped.shape == (experts, 12, 12)
        masks = (dropped != 0).permute(1, 0, 2).reshape(3, 4, experts, 12)
        assert not torch.equal(masks[..., 0, :], masks[..., 1, :])
    else:
        masks = (dropped != 0).reshape(3, 4, 1, 12).expand(3, 4, experts, 12)
    assert 0.35 < masks.double().mean() < 0.65
    x_ref = x.detach().clone().requires_grad_(True)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in
              (("A", layer.lora_A), ("B", layer.lora_B), ("router", layer.router.weight))}
    expected = reference_forward(x_ref, layer.weight, layer.bias, params["A"], params["B"], params["router"],
                                 scaling=layer.scaling, top_k=layer.top_k, rescale="sqrt",
                                 expert_input=x_ref.unsqueeze(-2) * masks / (1 - p))
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    (expected * upstream).sum().backward()
    for got, name in ((layer.lora_A.grad, "A"), (layer.lora_B.grad, "B"), (layer.router.weight.grad, "router")):
        torch.testing.assert_close(got, params[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)


def hand_aux_loss(x: torch.Tensor, router_weight: torch.Tensor, top_k: Optional[int], coef: float) -> torch.Tensor:
    """coef * E * sum_e f_e P_e, f_e = share of (token, slot) routings going to e, P_e = mean router probability."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(tokens @ router_weight.t(), dim=-1)
    num_tokens, num_experts = probs.shape
    k = num_experts if top_k is None else top_k
    chosen = probs.topk(k, dim=-1).indices
    total = 0.0
    for e in range(num_experts):
        f_e = sum(int(e in chosen[t].tolist()) for t in range(num_tokens)) / (num_tokens * k)
        P_e = probs[:, e].mean()
        total = total + f_e * P_e
    return coef * num_experts * total


@pytest.mark.parametrize("top_k", [1, 2, None])
def test_load_balancing_loss_by_hand(top_k):
    layer = make_layer(top_k=top_k, router_aux_loss_coef=0.05).train()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    layer(x)
    expected = hand_aux_loss(x, layer.router.weight.detach(), top_k, 0.05)
    torch.testing.assert_close(layer.aux_loss, expected, rtol=1e-10, atol=1e-12)
    if top_k is not None:
        layer.aux_loss.backward()
        assert layer.router.weight.grad.abs().max() > 0
        assert layer.lora_A.grad is None and layer.lora_B.grad is None
    layer.eval()
    layer(x)
    assert layer.aux_loss is None


def test_load_balancing_loss_on_by_default_off_at_zero_and_for_one_expert():
    x = torch.randn(4, 12, dtype=torch.float64)
    layer = make_layer(top_k=2).train()
    layer(x)
    torch.testing.assert_close(layer.aux_loss, hand_aux_loss(x, layer.router.weight.detach(), 2, 0.01), rtol=1e-10,
                               atol=1e-12)
    for off in (make_layer(top_k=2, router_aux_loss_coef=0.0), make_layer(num_experts=1, router_z_loss_coef=0.1)):
        off.train()(x)
        assert off.aux_loss is None


def layer_pair(**config) -> tuple[MoELoRALinear, MoELoRALinear]:
    """Two layers with identical parameters, one with sqrt gate rescaling and one without."""
    sqrt_layer = make_layer(gate_rescale="sqrt", **config)
    plain = make_layer(gate_rescale="none", **config)
    plain.load_state_dict(sqrt_layer.state_dict())
    return sqrt_layer, plain


@pytest.mark.parametrize("top_k", [None, 2])
def test_sqrt_rescaling_keeps_value_and_router_gradient(top_k):
    sqrt_layer, plain = layer_pair(top_k=top_k)
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    upstream = torch.randn(2, 6, 10, dtype=torch.float64)
    y_sqrt, y_plain = sqrt_layer(x), plain(x)
    torch.testing.assert_close(y_sqrt, y_plain, rtol=1e-12, atol=1e-12)
    (y_sqrt * upstream).sum().backward()
    (y_plain * upstream).sum().backward()
    torch.testing.assert_close(sqrt_layer.router.weight.grad, plain.router.weight.grad, rtol=1e-10, atol=1e-12)
    assert sqrt_layer.router.weight.grad.abs().max() > 1e-3
    # ...while the expert gradients do change (sqrt(g) != g for 0 < g < 1)
    assert not torch.allclose(sqrt_layer.lora_A.grad, plain.lora_A.grad)
    assert not torch.allclose(sqrt_layer.lora_B.grad, plain.lora_B.grad)


@pytest.mark.parametrize("rescale", ["sqrt", "none"])
@pytest.mark.parametrize("top_k", [None, 2])
def test_gradients_match_reference(rescale, top_k):
    layer = make_layer(top_k=top_k, gate_rescale=rescale)
    x = torch.randn(2, 6, 12, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in
              (("A", layer.lora_A), ("B", layer.lora_B), ("router", layer.router.weight))}
    upstream = torch.randn(2, 6, 10, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()
    expected = reference_forward(x_ref, layer.weight, layer.bias, params["A"], params["B"], params["router"],
                                 scaling=layer.scaling, top_k=layer.top_k, rescale=rescale)
    (expected * upstream).sum().backward()
    for got, name in ((layer.lora_A.grad, "A"), (layer.lora_B.grad, "B"), (layer.router.weight.grad, "router")):
        torch.testing.assert_close(got, params[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)


def test_sqrt_expert_gradient_is_sqrt_gate_weighted():
    """One token: d/dB_e of <u, y> is s * sqrt(g_e) * u (A_e x)^T under "sqrt", s * g_e * u (A_e x)^T under "none"."""
    sqrt_layer, plain = layer_pair()
    x = torch.randn(1, 12, dtype=torch.float64)
    upstream = torch.randn(1, 10, dtype=torch.float64)
    gates = reference_gates(x, sqrt_layer.router.weight.detach(), None)[0]
    for layer, weight in ((sqrt_layer, gates.sqrt()), (plain, gates)):
        (layer(x) * upstream).sum().backward()
        for e in range(4):
            expected = layer.scaling * weight[e] * upstream[0][:, None] * (layer.lora_A[e].detach() @ x[0])[None, :]
            torch.testing.assert_close(layer.lora_B.grad[e], expected, rtol=1e-10, atol=1e-12)
