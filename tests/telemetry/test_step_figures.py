"""The figures a metrics record gets besides loss and lr: peak memory per interval, the MFU estimate and its basis."""

from __future__ import annotations

import pytest

from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.inject import inject_moelora
from moelora_ds.telemetry.memory import PeakMemory
from moelora_ds.telemetry.mfu import ModelFlopsUtilisation, flops_per_token, peak_flops
from moelora_ds.telemetry.step_figures import StepFigures

from conftest import build_tiny_model


def test_cpu_peak_memory_is_reset_per_interval():
    memory = PeakMemory()
    if not memory.resettable:
        pytest.skip("this kernel does not let the process reset its peak resident set")
    before = memory.gb()
    block = bytearray(300 * 10**6)  # touched: resident
    assert memory.gb() > before + 0.25
    del block
    memory.reset()
    assert memory.gb() < before + 0.1


def test_flops_per_token_counts_trainable_parameters_six_times_and_frozen_ones_four_times():
    model = build_tiny_model("llama")
    inject_moelora(model, MoELoRAConfig(num_experts=4, rank=2, top_k=2, router_noise=0.0, target_modules=["q_proj"]))
    skipped = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad and id(p) not in skipped)
    assert trainable > 0 and flops_per_token(model) == 6 * trainable + 4 * frozen


def test_mfu_only_where_the_peak_is_known():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA L40S") == 362e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("Some Future Card") is None and peak_flops(None) is None
    model = build_tiny_model("llama")
    assert ModelFlopsUtilisation(model, half_precision=True).figures(1e6) == {}  # the CPU: no listed peak
    figures = StepFigures(model, half_precision=False, world_size=2)
    record = figures.step(seconds=0.5, tokens=1000, labelled=40, grad_norm=None)
    assert record == {"step_time_s": 0.5, "tokens_per_s": 2000.0, "tokens_per_s_per_device": 1000.0,
                      "labelled_tokens": 40}
    figures.logged(record)
    assert record["peak_memory_gb"] > 0 and "mfu" not in record
