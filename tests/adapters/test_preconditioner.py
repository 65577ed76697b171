"""The in-backward Riemannian preconditioner against the explicit formulas of docs/METHOD.md section 2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.layer import MoELoRALinear
from moelora_ds.adapters.preconditioner import damped_gram, precondition_factors, precondition_gradients

from host_syncs import HostReads


def explicit_preconditioning(grad_A, grad_B, lora_A, lora_B, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_A <- (B^T B + dI)^-1 grad_A, grad_B <- grad_B (A A^T + dI)^-1, per expert, explicit float64 inverses."""
    A, B = lora_A.detach().double(), lora_B.detach().double()
    eye = torch.eye(A.shape[1], dtype=torch.float64)
    new_A = torch.stack([torch.linalg.inv(B[e].t() @ B[e] + reg * eye) @ grad_A[e].double() for e in range(A.shape[0])])
    new_B = torch.stack([grad_B[e].double() @ torch.linalg.inv(A[e] @ A[e].t() + reg * eye) for e in range(A.shape[0])])
    return new_A, new_B


def random_factors(experts=3, rank=4, in_features=9, out_features=7, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype) for shape in
            ((experts, rank, in_features), (experts, out_features, rank),
             (experts, rank, in_features), (experts, out_features, rank))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_damped_gram(dtype):
    A, B, _, _ = random_factors(dtype=dtype)
    gram_B = damped_gram(B, 0.3, contract_rows=True)
    gram_A = damped_gram(A, 0.3, contract_rows=False)
    assert gram_A.dtype == gram_B.dtype == torch.float64
    eye = 0.3 * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(gram_B.double(), B.double().transpose(1, 2) @ B.double() + eye, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gram_A.double(), A.double() @ A.double().transpose(1, 2) + eye, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reg", [1e-6, 1e-2, 10.0])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_precondition_gradients_match_explicit_inverse(reg, dtype, tol):
    A, B, grad_A, grad_B = random_factors(dtype=dtype)
    new_A, new_B = precondition_gradients(grad_A, grad_B, damped_gram(B, reg, contract_rows=True),
                                          damped_gram(A, reg, contract_rows=False))
    assert new_A.dtype == new_B.dtype == dtype
    ref_A, ref_B = explicit_preconditioning(grad_A, grad_B, A, B, reg)
    torch.testing.assert_close(new_A.double(), ref_A, rtol=tol, atol=tol * ref_A.abs().max().item())
    torch.testing.assert_close(new_B.double(), ref_B, rtol=tol, atol=tol * ref_B.abs().max().item())
    assert not torch.allclose(new_A.double(), grad_A.double())


def test_precondition_gradients_with_zero_B():
    """At initialisation B = 0: the A preconditioner is 1/delta, the B one uses A only."""
    A, _, grad_A, grad_B = random_factors()
    B = torch.zeros(3, 7, 4, dtype=torch.float64)
    new_A, new_B = precondition_gradients(grad_A, grad_B, damped_gram(B, 1e-3, contract_rows=True),
                                          damped_gram(A, 1e-3, contract_rows=False))
    torch.testing.assert_close(new_A, grad_A / 1e-3)
    torch.testing.assert_close(new_B, explicit_preconditioning(grad_A, grad_B, A, B, 1e-3)[1])


def test_ill_conditioned_gram_where_fp32_cholesky_fails():
    """B's columns nearly parallel and a small delta: the fp32 Gram is not numerically positive definite (fp32
    Cholesky fails), the float64 one is, and the result matches explicit float64 inverses."""
    gen = torch.Generator().manual_seed(3)
    column = torch.randn(2, 50, 1, generator=gen, dtype=torch.float64) * 30
    B = (column.expand(2, 50, 4) + 1e-4 * torch.randn(2, 50, 4, generator=gen, dtype=torch.float64)).float()
    A = torch.randn(2, 4, 9, generator=gen).float()
    grad_A, grad_B = torch.randn(2, 4, 9, generator=gen), torch.randn(2, 50, 4, generator=gen)
    reg = 1e-6
    fp32_gram = B.transpose(1, 2) @ B + reg * torch.eye(4)
    assert (torch.linalg.cholesky_ex(fp32_gram).info != 0).any()
    new_A, new_B = precondition_gradients(grad_A, grad_B, damped_gram(B, reg, contract_rows=True),
                                          damped_gram(A, reg, contract_rows=False))
    assert torch.isfinite(new_A).all() and torch.isfinite(new_B).all()
    ref_A, ref_B = explicit_preconditioning(grad_A, grad_B, A, B, reg)
    torch.testing.assert_close(new_A.double(), ref_A, rtol=1e-3, atol=1e-3 * ref_A.abs().max().item())
    torch.testing.assert_close(new_B.double(), ref_B, rtol=1e-3, atol=1e-3 * ref_B.abs().max().item())


def test_backward_reads_nothing_back_to_the_host():
    """A preconditioned layer's forward and backward never wait for the device (tests/host_syncs.py)."""
    layer = random_layer(dtype=torch.float32)
    layer.riemannian_reg = 1e-3
    x = torch.randn(4, 5, 10)
    with HostReads() as reads:
        layer(x).square().sum().backward()
    assert layer.lora_A.grad is not None and dict(reads.by_caller) == {}


def test_precondition_factors_identity_forward_preconditioned_backward():
    A, B, grad_A, grad_B = random_factors()
    A, B = A.requires_grad_(True), B.requires_grad_(True)
    A_out, B_out = precondition_factors(A, B, 0.5)
    assert torch.equal(A_out, A) and torch.equal(B_out, B)
    ref_A, ref_B = explicit_preconditioning(grad_A, grad_B, A, B, 0.5)
    loss = (A_out * grad_A).sum() + (B_out * grad_B).sum()
    with torch.no_grad():  # the Grams are those of the forward-time values, whatever happens before backward
        A.mul_(3.0)
        B.add_(1.0)
    loss.backward()
    torch.testing.assert_close(A.grad, ref_A, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(B.grad, ref_B, rtol=1e-9, atol=1e-9)


def random_layer(dtype=torch.float64, **config) -> MoELoRALinear:
    torch.manual_seed(0)
    config = {"num_experts": 3, "rank": 4, "alpha": 8.0, "dropout": 0.0, "top_k": 2, "router_noise": 0.0, **config}
    layer = MoELoRALinear(nn.Linear(10, 8, dtype=dtype), MoELoRAConfig(**config))
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.3)
    return layer


def layer_grads(layer: MoELoRALinear, x: torch.Tensor, upstream: torch.Tensor, micro_batches: int = 1):
    for p in layer.parameters():
        p.grad = None
    for chunk_x, chunk_u in zip(x.chunk(micro_batches), upstream.chunk(micro_batches)):
        (layer(chunk_x) * chunk_u).sum().backward()
    return layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), layer.router.weight.grad.clone()


@pytest.mark.parametrize("rescale", ["sqrt", "none"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_layer_gradients_preconditioned_in_backward(rescale, micro_batches):
    """With riemannian_reg set, A/B gradients (also accumulated over micro-batches) are P(raw); the router's are raw."""
    layer = random_layer(gate_rescale=rescale)
    x = torch.randn(4, 5, 10, dtype=torch.float64)
    upstream = torch.randn(4, 5, 8, dtype=torch.float64)
    raw_A, raw_B, raw_router = layer_grads(layer, x, upstream)
    layer.riemannian_reg = 0.05
    got_A, got_B, got_router = layer_grads(layer, x, upstream, micro_batches)
    ref_A, ref_B = explicit_preconditioning(raw_A, raw_B, layer.lora_A, layer.lora_B, 0.05)
    torch.testing.assert_close(got_A, ref_A, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got_B, ref_B, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got_router, raw_router, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got_A, raw_A) and not torch.allclose(got_B, raw_B)


def test_bf16_layer_preconditioned_in_fp32():
    layer = random_layer(dtype=torch.bfloat16)
    x = torch.randn(6, 10, dtype=torch.bfloat16)
    upstream = torch.randn(6, 8, dtype=torch.bfloat16)
    raw_A, raw_B, _ = layer_grads(layer, x, upstream)
    layer.riemannian_reg = 0.1
    got_A, got_B, _ = layer_grads(layer, x, upstream)
    assert got_A.dtype == got_B.dtype == torch.bfloat16
    ref_A, ref_B = explicit_preconditioning(raw_A, raw_B, layer.lora_A, layer.lora_B, 0.1)
    torch.testing.assert_close(got_A.double(), ref_A, rtol=2e-2, atol=2e-2 * ref_A.abs().max().item())
    torch.testing.assert_close(got_B.double(), ref_B, rtol=2e-2, atol=2e-2 * ref_B.abs().max().item())


def test_forward_without_grad_is_unaffected():
    layer = random_layer()
    x = torch.randn(3, 10, dtype=torch.float64)
    expected = layer(x).detach()
    layer.riemannian_reg = 1e-3
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(layer(x).detach(), expected, rtol=0, atol=0)
