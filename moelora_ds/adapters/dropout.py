"""Dropout whose masks come from an explicit generator: one stream per rank, seeded from (train.seed, rank).

With torch's `nn.Dropout` the masks come from the device's global generator, which every rank seeds
alike (identical masks on every rank whenever the shapes match, which packing makes always) and which
anything else may draw from. Here every mask is drawn from a generator that only dropout uses: the
trainer gives all layers of a rank one generator on its device (`use_dropout_generator`), seeded by
`dropout_seed(seed, rank)`, and saves its state with the rank's checkpoint files, so a resumed run
draws the masks the uninterrupted one would have. Adapter initialisation draws from its own per-layer
CPU generators (layer.py), the same on every rank.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
from torch import nn


def dropout_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s dropout stream: from the run's seed and the rank only."""
    return int.from_bytes(hashlib.sha256(f"dropout:{seed}:{rank}".encode()).digest()[:7], "little")


def dropout_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded with `dropout_seed(seed, rank)`."""
    return torch.Generator(device=device).manual_seed(dropout_seed(seed, rank))


class SeededDropout(nn.Module):
    """Inverted dropout (`x * mask / (1 - p)`, a boolean mask kept for backward) drawn from `generator`.

    `generator` None draws from the device's default generator (a layer used outside the trainer).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.generator: Optional[torch.Generator] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape, generator=self.generator, device=x.device) >= self.p
        return (x * keep).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_dropout_generator(model: nn.Module, generator: torch.Generator) -> None:
    """Make every SeededDropout of `model` draw from `generator`."""
    for module in model.modules():
        if isinstance(module, SeededDropout):
            module.generator = generator
