"""Dropout masks from an explicit per-rank generator: the rank's own stream, reproducible, resumable, and untouched
by (and not touching) the global random streams."""

from __future__ import annotations

import torch

from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.dropout import SeededDropout, dropout_generator, use_dropout_generator
from moelora_ds.adapters.layer import MoELoRALinear


def masks(generator: torch.Generator, draws: int = 2, p: float = 0.5) -> list[torch.Tensor]:
    dropout = SeededDropout(p).train()
    dropout.generator = generator
    return [dropout(torch.ones(64, 32)) != 0 for _ in range(draws)]


def test_ranks_draw_different_masks_and_a_rerun_draws_the_same():
    cpu = torch.device("cpu")
    rank0, rank1 = masks(dropout_generator(7, 0, cpu)), masks(dropout_generator(7, 1, cpu))
    again = masks(dropout_generator(7, 0, cpu))
    assert not torch.equal(rank0[0], rank1[0]) and not torch.equal(rank0[0], rank0[1])
    assert all(torch.equal(a, b) for a, b in zip(rank0, again))


def test_a_restored_generator_continues_the_stream():
    generator = dropout_generator(7, 0, torch.device("cpu"))
    first = masks(generator, draws=1)
    state = generator.get_state()
    expected = masks(generator)
    restored = dropout_generator(7, 0, torch.device("cpu"))
    restored.set_state(state)
    assert not torch.equal(first[0], expected[0])
    assert all(torch.equal(a, b) for a, b in zip(masks(restored), expected))


def test_values_and_eval_mode():
    dropout = SeededDropout(0.25).train()
    x = torch.randn(200, 50, dtype=torch.float64)
    y = dropout(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] * (1 / 0.75), rtol=0, atol=0)
    assert abs((~kept).double().mean().item() - 0.25) < 0.03
    assert dropout.eval()(x) is x


def test_layers_share_the_rank_generator_and_leave_global_streams_alone():
    """Every layer of a model draws from the generator it was given; the global torch stream does not move (so the
    layers' initialisation and anything else seeded globally is independent of dropout)."""
    config = MoELoRAConfig(num_experts=2, rank=2, alpha=4, dropout=0.1, target_modules=["q"])
    model = torch.nn.ModuleDict({"a": MoELoRALinear(torch.nn.Linear(8, 8), config, init_seed=1),
                                 "b": MoELoRALinear(torch.nn.Linear(8, 8), config, init_seed=2)}).train()
    generator = dropout_generator(7, 1, torch.device("cpu"))
    use_dropout_generator(model, generator)
    assert all(layer.dropout.generator is generator for layer in model.values())
    before = torch.get_rng_state()
    model["a"](torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.get_rng_state(), before)
