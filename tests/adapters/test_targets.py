"""`moelora.target_modules: attention | mlp` resolved per model family, on tiny models built from their configs."""

from __future__ import annotations

import pytest
import torch

from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.inject import find_target_linears, inject_moelora, moelora_layers
from moelora_ds.adapters.targets import FAMILY_TARGETS, preset_linears

from conftest import build_tiny_model

LLAMA_STYLE = {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
EXPECTED = {  # arch: {preset: the linear names of one decoder layer, in module order}
    "llama": LLAMA_STYLE, "mistral": LLAMA_STYLE, "qwen2": LLAMA_STYLE, "qwen3": LLAMA_STYLE,
    "gemma2": LLAMA_STYLE, "gemma3": LLAMA_STYLE,
    "phi3": {"attention": ["o_proj", "qkv_proj"], "mlp": ["gate_up_proj", "down_proj"]},
    "gpt_neox": {"attention": ["query_key_value", "dense"], "mlp": ["dense_h_to_4h", "dense_4h_to_h"]},
    "olmo2": LLAMA_STYLE,  # not in the table: found by the parent module's name (self_attn, mlp)
}


@pytest.mark.parametrize("preset", ["attention", "mlp"])
@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_presets_select_each_familys_linears(arch, preset):
    model = build_tiny_model(arch)
    paths = find_target_linears(model, MoELoRAConfig(target_modules=preset))
    per_layer = [[p.rsplit(".", 1)[-1] for p in paths if f".{layer}." in p] for layer in (0, 1)]
    assert per_layer == [EXPECTED[arch][preset]] * 2, paths
    if arch == "olmo2":
        assert model.config.model_type not in FAMILY_TARGETS  # the fallback is what is tested


@pytest.mark.parametrize("arch", ["phi3", "gemma3", "qwen3"])
def test_injected_preset_trains(arch):
    """The injected layers run forward and backward in the family's model (Phi-3's fused qkv_proj included)."""
    model = inject_moelora(build_tiny_model(arch), MoELoRAConfig(num_experts=2, rank=2, target_modules="mlp"))
    ids = torch.randint(3, 320, (2, 7), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    layers = list(moelora_layers(model))
    assert len(layers) == 2 * len(EXPECTED[arch]["mlp"])
    assert all(layer.lora_A.grad is not None for _, layer in layers)


def test_preset_leaves_a_multimodal_models_other_towers_alone():
    """Paths under `language_model` are the text decoder's; a vision tower's q_proj is not an attention target."""
    from torch import nn

    class Multimodal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = build_tiny_model("llama").config
            self.vision_tower = nn.ModuleDict({"q_proj": nn.Linear(4, 4)})
            self.language_model = build_tiny_model("llama").model

    paths = preset_linears(Multimodal(), "attention")
    assert len(paths) == 8 and all(p.startswith("language_model.") for p in paths)


def test_a_family_without_the_preset_names_what_it_has():
    model = build_tiny_model("llama")
    model.config.model_type = "unknown_family"
    for _, module in model.named_modules():
        for name, child in list(module.named_children()):
            if name in ("self_attn", "mlp"):
                module.add_module({"self_attn": "mixer", "mlp": "block"}[name], child)
                delattr(module, name)
    with pytest.raises(ValueError, match=r"'attention' finds no nn.Linear .*'unknown_family'.*q_proj"):
        find_target_linears(model, MoELoRAConfig(target_modules="attention"))
