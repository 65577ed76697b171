"""Noise for noisy top-k expert selection: a pure function of (layer seed, key, token, expert), no generator.

Every value is computed from integer hashes of its coordinates, on whatever device the logits are, so it is the
same on every device, ZeRO stage and world size (no device generator and no generator state to save), and a
forward recomputed by gradient checkpointing sees the same noise as the first. The trainer sets the key once
per micro-batch (`set_routing_noise_key`) from the rank and the micro-batch's position in the run, so a resumed
run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_MASK32 = 0xFFFFFFFF


def _hash32(x):
    """A 32-bit integer mixing function (lowbias32), on Python ints or int64 tensors holding values below 2^32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _uniform(index: torch.Tensor, salt: int) -> torch.Tensor:
    """Uniform (0, 1) float64 values, one per int64 `index`, from `salt` (below 2^32)."""
    bits = _hash32(_hash32(index & _MASK32) ^ salt ^ _hash32((index >> 32) & _MASK32))
    return (bits.double() + 0.5) / 2.0 ** 32


def routing_noise(shape: tuple[int, int], seed: int, key: int, device: torch.device) -> torch.Tensor:
    """Standard normal float32 values of `shape` (tokens, experts), a function of (seed, key, position) only."""
    salt = _hash32(_hash32((seed ^ (seed >> 32)) & _MASK32) ^ (key & _MASK32))  # Python ints: nothing read back
    index = torch.arange(shape[0] * shape[1], dtype=torch.int64, device=device)
    u1, u2 = _uniform(index, salt), _uniform(index, salt ^ 0x9E3779B9)
    normal = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return normal.float().view(shape)


def set_routing_noise_key(model: nn.Module, key: int) -> None:
    """Key the routing noise of every MoE-LoRA layer of `model` for the next training forward."""
    from moelora_ds.adapters.inject import moelora_layers

    for _, layer in moelora_layers(model):
        layer.noise_key = key
