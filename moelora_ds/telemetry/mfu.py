"""Model FLOPs utilisation (metrics.jsonl's `mfu`): the model FLOPs a trained token costs against the device's peak.

FLOPs per token = 6 x trainable + 4 x frozen parameters: the forward pass multiplies every weight once (2
FLOPs per weight and token), the backward pass needs the input gradient through every weight (2 more) and
the weight gradient only for the trainable ones (2 more). The input embedding (a lookup) and the output
head (run only where a label is predicted, training/loss.py) are left out, attention's sequence-length term
too; recomputation under gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).
`mfu = flops_per_token x tokens_per_s_per_device / peak`, with non-padding tokens, for bf16/fp16 runs on
devices whose dense half-precision peak is listed below; elsewhere (the CPU, fp32, other devices) no `mfu`.
"""

from __future__ import annotations

from typing import Optional

import torch
from deepspeed.accelerator import get_accelerator
from torch import nn

PEAK_HALF_PRECISION_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                             ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12))
"""Dense bf16/fp16 tensor-core peak FLOP/s per device, by the first name fragment found in the device's name."""


def device_name() -> Optional[str]:
    """The current accelerator's product name (torch's `get_device_name` of the accelerator's backend), None on the
    CPU or where the backend has none."""
    accelerator = get_accelerator()
    backend = getattr(torch, accelerator.device_name(), None)
    if backend is None or not hasattr(backend, "get_device_name") or accelerator.device_name() == "cpu":
        return None
    return backend.get_device_name(accelerator.current_device())


def peak_flops(name: Optional[str]) -> Optional[float]:
    """The listed dense half-precision peak of device `name`, or None."""
    return next((flops for fragment, flops in PEAK_HALF_PRECISION_FLOPS if name and fragment in name), None)


def flops_per_token(model: nn.Module) -> float:
    """6 x trainable + 4 x frozen parameters (ZeRO-3 partitioned ones at their full size), without the input embedding
    and the output head."""
    skipped = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    trainable = frozen = 0
    for param in model.parameters():
        if id(param) in skipped:
            continue
        numel = getattr(param, "ds_numel", param.numel())
        trainable += numel if param.requires_grad else 0
        frozen += 0 if param.requires_grad else numel
    return 6.0 * trainable + 4.0 * frozen


class ModelFlopsUtilisation:
    """`figures(tokens_per_s_per_device)`: {"mfu": ...} where the device's peak is known for a half-precision run,
    else {}."""

    def __init__(self, model: nn.Module, half_precision: bool) -> None:
        self.peak = peak_flops(device_name()) if half_precision else None
        self.per_token = flops_per_token(model) if self.peak else 0.0

    def figures(self, tokens_per_s_per_device: float) -> dict[str, float]:
        return {"mfu": self.per_token * tokens_per_s_per_device / self.peak} if self.peak else {}
