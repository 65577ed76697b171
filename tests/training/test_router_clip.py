"""optimizer.router_clip in one process: the routers' gradient clipped alone, as torch's clip_grad_norm_ on them would.

Under ZeRO stages 1-3 (flat partitions, the norm summed over ranks) it is checked with real ranks in
tests/training/test_trainer.py (test_paper_recipe_matches_plain_reference).
"""

from __future__ import annotations

import pytest
import torch

from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.inject import adapter_parameters, inject_moelora, moelora_layers
from moelora_ds.config import OptimizerConfig
from moelora_ds.training.optimizers import build_optimizer

from conftest import build_tiny_model


def raw_gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=batch, labels=batch).loss.backward()
    return {name: p.grad.clone() for name, p in adapter_parameters(model).items()}


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_router_clip_scales_the_router_gradient_alone(max_norm):
    """Plain SGD at lr 1: each parameter moves by minus the gradient it was stepped with."""
    config = MoELoRAConfig(num_experts=3, rank=2, top_k=2, dropout=0.0, router_noise=0.0)
    model = inject_moelora(build_tiny_model("llama").double(), config)
    with torch.no_grad():
        for _, layer in moelora_layers(model):
            layer.lora_B.normal_(0.0, 0.05)  # B = 0 would give the routers no gradient
    batch = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = raw_gradients(model, batch)
    routers = [grads[name] for name in grads if name.endswith(".router.weight")]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in routers]))
    copies = [torch.nn.Parameter(torch.zeros_like(g)) for g in routers]
    for copy, grad in zip(copies, routers):
        copy.grad = grad.clone()
    torch.nn.utils.clip_grad_norm_(copies, max_norm)
    clipped = [copy.grad for copy in copies]

    before = {name: p.detach().clone() for name, p in adapter_parameters(model).items()}
    optimizer = build_optimizer(model, OptimizerConfig(name="sgd", lr=1.0, router_clip=max_norm), offload=False)
    raw_gradients(model, batch)
    optimizer.step()
    after = adapter_parameters(model)
    router_names = [name for name in grads if name.endswith(".router.weight")]
    for name, want in zip(router_names, clipped):
        torch.testing.assert_close(before[name] - after[name], want, rtol=1e-9, atol=1e-12)
    for name in grads.keys() - set(router_names):  # expert gradients are not clipped
        torch.testing.assert_close(before[name] - after[name], grads[name], rtol=1e-9, atol=1e-12)
    moved = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(before[n] - after[n].detach())
                                                  for n in router_names]))
    assert moved == pytest.approx(min(norm.item(), max_norm), rel=1e-4)
    assert norm > 1e-2  # the small limit really clips
