"""`model.dtype: auto`: the training precision this machine's hardware runs natively, and why.

bf16 on a CUDA-class device that supports it, fp16 (DeepSpeed's dynamic loss scaling) on one that does
not, bf16 on a CPU with bf16 matrix instructions (AMX or AVX512-BF16), fp32 on any other CPU, where
bf16 matrix products are emulated (measured 94x slower than fp32 on an AVX2-only AMD EPYC).
`MOELORA_CPU_BF16=1` or `=0` overrides the CPU detection (containers may hide the CPU flags).

`model.attn_implementation: auto` follows the precision: on the CPU in bf16/fp16, transformers' eager
attention (torch's fused CPU attention is slow to differentiate in bf16: RESULTS.md, "Attention on the
CPU"), elsewhere transformers' default (SDPA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPU_BF16_ENV = "MOELORA_CPU_BF16"


@dataclass(frozen=True)
class Hardware:
    """What the precision rule looks at."""

    device: str
    """The accelerator's device name ("cpu", "cuda", ...)."""
    bf16: bool
    """The device multiplies bf16 matrices natively."""
    fp16: bool
    """The device multiplies fp16 matrices natively."""
    detail: str
    """How that was found, for the message."""


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is not available)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_hardware(flags: set[str], override: str | None = None) -> Hardware:
    """The CPU's bf16 support from its flags, or from an explicit `MOELORA_CPU_BF16` value."""
    if override is not None:
        if override not in ("0", "1"):
            raise ValueError(f"{CPU_BF16_ENV}={override!r}: expected 1 (the CPU has bf16 matrix instructions) or 0")
        return Hardware("cpu", bf16=override == "1", fp16=False, detail=f"{CPU_BF16_ENV}={override}")
    found = [flag for flag in CPU_BF16_FLAGS if flag in flags]
    if found:
        return Hardware("cpu", bf16=True, fp16=False, detail=f"CPU flag {found[0]}")
    import torch

    return Hardware("cpu", bf16=False, fp16=False,
                    detail=f"CPU capability {torch.backends.cpu.get_cpu_capability()}, no amx_bf16/avx512_bf16 flag")


def detect_hardware() -> Hardware:
    """This process's accelerator (DeepSpeed's choice) and its native low-precision support."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    device = accelerator.device_name()
    if device == "cpu":
        return cpu_hardware(cpu_flags(), os.environ.get(CPU_BF16_ENV))
    return Hardware(device, bf16=accelerator.is_bf16_supported(), fp16=accelerator.is_fp16_supported(),
                    detail=f"{device} accelerator")


def choose_dtype(hardware: Hardware) -> tuple[str, str]:
    """(dtype, reason): the precision `hardware` runs natively."""
    if hardware.bf16:
        return "bfloat16", f"auto: {hardware.detail} runs bf16 natively"
    if hardware.fp16 and hardware.device != "cpu":
        return "float16", f"auto: {hardware.detail} has no bf16 but fp16 (with dynamic loss scaling)"
    why = "bf16 would be emulated (up to ~100x slower)" if hardware.device == "cpu" else "no bf16 or fp16 support"
    return "float32", f"auto: {hardware.detail}: {why}"


def resolve_dtype(requested: str, announce: bool) -> str:
    """`requested` with "auto" replaced by this machine's choice; `announce` prints the choice and its reason."""
    if requested != "auto":
        return requested
    dtype, reason = choose_dtype(detect_hardware())
    if announce:
        print(f"[moelora-ds] precision: {dtype} ({reason})", flush=True)
    return dtype


def resolve_attention(requested: str, dtype: str, device: str | None = None) -> str | None:
    """The `attn_implementation` to load models with: `requested`, or for "auto" eager attention on the CPU in a
    16-bit dtype and None (transformers' default) otherwise; `device` defaults to the accelerator's."""
    if requested != "auto":
        return requested
    if device is None:
        from deepspeed.accelerator import get_accelerator

        device = get_accelerator().device_name()
    return "eager" if device == "cpu" and dtype in ("bfloat16", "float16") else None
