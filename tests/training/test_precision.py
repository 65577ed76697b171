"""`model.dtype: auto`: the rule on forced hardware either way, and the detection on this machine; the attention
implementation that follows the precision (`model.attn_implementation: auto`)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from moelora_ds.config import load_config
from moelora_ds.models.loading import load_base_model
from moelora_ds.training.deepspeed_config import build_deepspeed_config
from moelora_ds.training.precision import (
    CPU_BF16_ENV,
    Hardware,
    choose_dtype,
    cpu_flags,
    cpu_hardware,
    detect_hardware,
    resolve_attention,
)


@pytest.mark.parametrize("hardware,expected", [
    (Hardware("cuda", bf16=True, fp16=True, detail="H100"), "bfloat16"),
    (Hardware("cuda", bf16=False, fp16=True, detail="V100"), "float16"),
    (Hardware("cpu", bf16=True, fp16=False, detail="CPU flag amx_bf16"), "bfloat16"),
    (Hardware("cpu", bf16=False, fp16=False, detail="AVX2"), "float32"),
    (Hardware("cpu", bf16=False, fp16=True, detail="fp16 on a CPU is emulated too"), "float32"),
])
def test_the_rule(hardware, expected):
    dtype, reason = choose_dtype(hardware)
    assert dtype == expected and hardware.detail in reason


@pytest.mark.parametrize("flags,bf16", [({"avx2", "fma"}, False), ({"avx512f", "avx512_bf16"}, True),
                                        ({"avx512f", "amx_bf16", "amx_tile"}, True)])
def test_cpu_flags_decide(flags, bf16):
    assert cpu_hardware(flags).bf16 is bf16


def test_environment_override_wins_and_is_checked():
    assert cpu_hardware({"amx_bf16"}, override="0").bf16 is False
    assert cpu_hardware({"avx2"}, override="1").bf16 is True
    with pytest.raises(ValueError, match=CPU_BF16_ENV):
        cpu_hardware(set(), override="yes")


def test_detection_on_this_machine_agrees_with_lscpu(monkeypatch):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    flags_line = next(line for line in lscpu.splitlines() if line.startswith("Flags:"))
    native = any(flag in flags_line.split() for flag in ("amx_bf16", "avx512_bf16"))
    assert cpu_flags() == set(flags_line.split(":", 1)[1].split())
    assert detect_hardware() == cpu_hardware(cpu_flags())
    assert detect_hardware().bf16 is native


@pytest.mark.parametrize("forced,bf16", [("1", True), ("0", False)])
def test_auto_sets_deepspeed_precision(monkeypatch, forced, bf16):
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    ds = build_deepspeed_config(load_config(None, []))
    assert ds["bf16"]["enabled"] is bf16 and ds["fp16"]["enabled"] is False


@pytest.mark.parametrize("requested,dtype,device,expected", [
    ("auto", "bfloat16", "cpu", "eager"), ("auto", "float16", "cpu", "eager"), ("auto", "float32", "cpu", None),
    ("auto", "bfloat16", "cuda", None), ("sdpa", "bfloat16", "cpu", "sdpa"), ("eager", "float32", "cuda", "eager"),
])
def test_attention_follows_the_precision(requested, dtype, device, expected):
    assert resolve_attention(requested, dtype, device) == expected


@pytest.mark.parametrize("dtype,requested,expected", [("bfloat16", "auto", "eager"), ("float32", "auto", "sdpa"),
                                                      ("bfloat16", "sdpa", "sdpa")])
def test_models_load_with_the_chosen_attention(tiny_model_dir, dtype, requested, expected):
    """On the CPU (this test's accelerator) a bf16 model gets eager attention, an fp32 one transformers' default."""
    model = load_base_model(tiny_model_dir, dtype, attention=requested)
    assert model.config._attn_implementation == expected and model.dtype == getattr(torch, dtype)
