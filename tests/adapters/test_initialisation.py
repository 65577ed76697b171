"""The starting adapters: drawn by a seeded CPU generator, whatever device, dtype or layer set the base has."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.inject import adapter_parameters, inject_moelora, layer_init_seed

from conftest import build_tiny_model, tiny_model_config

CONFIG = MoELoRAConfig(num_experts=3, rank=2, top_k=2)


class RandomDraws(TorchDispatchMode):
    """Records (op, device of the filled tensor, generator passed) for every in-place random fill of real values
    (a fill of a meta tensor draws nothing: meta tensors hold no values)."""

    RANDOM_OPS = {"uniform_", "normal_", "bernoulli_", "random_", "exponential_", "geometric_", "cauchy_",
                  "log_normal_"}

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[tuple[str, str, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.RANDOM_OPS and args[0].device.type != "meta":
            self.draws.append((name, args[0].device.type, kwargs.get("generator")))
        return func(*args, **kwargs)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_every_draw_is_on_the_cpu_with_an_explicit_generator(device):
    """A base whose weights report another device (meta here, a GPU under ZeRO-3) still gets its adapters drawn by a
    seeded CPU generator: no draw from the default generator of any device, and none on the base's device."""
    with torch.device(device):
        model = build_tiny_model("llama") if device == "cpu" else _meta_model()
    with RandomDraws() as recorder:
        inject_moelora(model, CONFIG, seed=3)
    assert len(recorder.draws) == 2 * 8, recorder.draws  # lora_A and router of 8 layers (2 x q, k, v, o)
    for op, where, generator in recorder.draws:
        assert where == "cpu", f"{op} drawn on {where}"
        assert isinstance(generator, torch.Generator) and generator.device.type == "cpu", f"{op} with {generator}"
    assert all(p.device.type == device for p in adapter_parameters(model).values())


def _meta_model() -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(tiny_model_config("llama"))


def _adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in adapter_parameters(model).items()}


def test_same_seed_same_start_whatever_the_global_streams_or_dtype():
    torch.manual_seed(0)
    first = _adapters(inject_moelora(build_tiny_model("llama"), CONFIG, seed=5))
    torch.manual_seed(1)
    torch.rand(1000)  # the global stream elsewhere: the adapters must not see it
    second = _adapters(inject_moelora(build_tiny_model("llama"), CONFIG, seed=5))
    bf16 = _adapters(inject_moelora(build_tiny_model("llama").to(torch.bfloat16), CONFIG, seed=5))
    other_seed = _adapters(inject_moelora(build_tiny_model("llama"), CONFIG, seed=6))
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=0)
        # bf16 adapters are the fp32 draw rounded to bf16 (half an ulp: 2^-9 relative).
        torch.testing.assert_close(bf16[name], first[name].to(torch.bfloat16).float(), rtol=0, atol=0)
        if not name.endswith("lora_B"):
            assert not torch.equal(other_seed[name], first[name]), name


def test_a_layer_start_depends_on_its_path_not_on_the_other_layers():
    everything = _adapters(inject_moelora(build_tiny_model("llama"), CONFIG, seed=5))
    q_only = _adapters(inject_moelora(build_tiny_model("llama"),
                                      MoELoRAConfig(num_experts=3, rank=2, top_k=2, target_modules=["q_proj"]), seed=5))
    assert q_only and set(q_only) < set(everything)
    for name, tensor in q_only.items():
        torch.testing.assert_close(tensor, everything[name], rtol=0, atol=0)
    a = [t for n, t in everything.items() if n.endswith("lora_A")]
    assert not torch.equal(a[0], a[1]), "two layers drew the same A"
    paths = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")
    assert layer_init_seed(5, paths[0]) != layer_init_seed(5, paths[1])
