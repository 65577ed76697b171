"""Injecting MoE-LoRA into tiny Hugging Face models, target selection, and MoELoRAConfig validation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.inject import (
    adapter_parameters,
    find_target_linears,
    inject_moelora,
    moelora_layers,
    router_aux_loss,
)
from moelora_ds.adapters.layer import MoELoRALinear

from conftest import build_tiny_model, tiny_model_config

ATTENTION = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
             "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"], "gpt_neox": ["query_key_value", "dense"]}


def linear_paths(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def input_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", sorted(ATTENTION))
def test_injection_into_tiny_models(arch):
    base = build_tiny_model(arch)
    model = inject_moelora(copy.deepcopy(base), MoELoRAConfig(num_experts=3, rank=2, top_k=2,
                                                              target_modules=ATTENTION[arch]))
    paths = [path for path, _ in moelora_layers(model)]
    assert len(paths) == 2 * len(ATTENTION[arch])
    assert all(path.rsplit(".", 1)[-1] in ATTENTION[arch] for path in paths)

    # only the adapter parameters are trainable, under their public names and shapes
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    expected = {f"{path}.{suffix}" for path in paths for suffix in ("lora_A", "lora_B", "router.weight")}
    assert trainable.keys() == expected == adapter_parameters(model).keys()
    for path, layer in moelora_layers(model):
        out_features, in_features = base.get_submodule(path).weight.shape
        assert trainable[f"{path}.lora_A"].shape == (3, 2, in_features)
        assert trainable[f"{path}.lora_B"].shape == (3, out_features, 2)
        assert trainable[f"{path}.router.weight"].shape == (3, in_features)
        assert layer.weight is model.get_submodule(path).weight
    # the base model's parameter names and values are untouched
    state = model.state_dict()
    for name, value in base.state_dict().items():
        assert torch.equal(state[name], value), name

    # at init (B = 0) the output is the base model's; once B moves it is not
    ids = input_ids()
    with torch.no_grad():
        expected_logits = base(input_ids=ids).logits
        logits = model(input_ids=ids).logits
        assert logits.shape == (2, 9, 320)
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
        for _, layer in moelora_layers(model):
            layer.lora_B.normal_(0.0, 0.1)
        assert (model(input_ids=ids).logits - expected_logits).abs().max() > 1e-4
    # a backward reaches every adapter parameter and nothing else
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in trainable.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def selected(arch: str, target_modules) -> list[str]:
    return find_target_linears(build_tiny_model(arch), MoELoRAConfig(target_modules=target_modules))


def test_suffix_list_matches_whole_name_components():
    assert selected("llama", ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert selected("llama", ["mlp.down_proj", "self_attn.o_proj"]) == [
        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    # "dense" is a whole component: it selects attention.dense, not dense_h_to_4h / dense_4h_to_h
    assert selected("gpt_neox", ["dense"]) == ["gpt_neox.layers.0.attention.dense", "gpt_neox.layers.1.attention.dense"]


def test_regex_is_matched_against_the_full_path():
    assert selected("qwen2", r"model\.layers\.1\.self_attn\.(q|v)_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert selected("mistral", r".*\.mlp\..*") == [p for p in linear_paths(build_tiny_model("mistral")) if ".mlp." in p]
    with pytest.raises(ValueError, match="q_proj"):  # fullmatch: a bare suffix is not a regex over the path
        selected("llama", "q_proj")


@pytest.mark.parametrize("arch", sorted(ATTENTION))
def test_all_linear_excludes_the_output_head(arch):
    model = build_tiny_model(arch)
    chosen = selected(arch, "all-linear")
    head = model.get_output_embeddings()
    head_paths = [name for name, module in model.named_modules() if module is head]
    assert head_paths and not set(head_paths) & set(chosen)
    assert chosen == [p for p in linear_paths(model) if p not in head_paths]
    inject_moelora(model, MoELoRAConfig(num_experts=2, rank=2, target_modules="all-linear"))
    assert isinstance(model.get_output_embeddings(), nn.Linear)
    assert not isinstance(model.get_output_embeddings(), MoELoRALinear)
    assert len(list(moelora_layers(model))) == len(chosen)


def test_all_linear_with_tied_embeddings():
    from transformers import AutoModelForCausalLM

    config = tiny_model_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    inject_moelora(model, MoELoRAConfig(num_experts=2, rank=2, target_modules="all-linear"))
    assert "lm_head" not in [path for path, _ in moelora_layers(model)]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert not model.get_input_embeddings().weight.requires_grad


def test_explicit_head_target_is_allowed():
    assert selected("llama", ["lm_head"]) == ["lm_head"]


@pytest.mark.parametrize("targets", [["q_proj", "nonexistent"], r"model\.nothing\..*", ["proj"]])
def test_unmatched_target_raises_with_candidates(targets):
    with pytest.raises(ValueError) as error:
        inject_moelora(build_tiny_model("llama"), MoELoRAConfig(target_modules=targets))
    message = str(error.value)
    unmatched = targets if isinstance(targets, str) else targets[-1]
    assert repr(unmatched) in message
    for candidate in ("q_proj", "down_proj", "gate_proj", "lm_head"):
        assert candidate in message


def test_default_targets_are_each_familys_attention():
    model = inject_moelora(build_tiny_model("gpt_neox"), MoELoRAConfig())
    assert [path.rsplit(".", 1)[-1] for path, _ in moelora_layers(model)] == ["query_key_value", "dense"] * 2


def test_names_missing_in_gpt_neox_name_its_linears():
    with pytest.raises(ValueError, match="query_key_value"):
        inject_moelora(build_tiny_model("gpt_neox"), MoELoRAConfig(target_modules=["q_proj", "v_proj"]))


def test_router_aux_loss_sums_layers():
    model = inject_moelora(build_tiny_model("llama"),
                           MoELoRAConfig(num_experts=4, rank=2, top_k=2, router_aux_loss_coef=0.1)).train()
    model(input_ids=input_ids())
    losses = [layer.aux_loss for _, layer in moelora_layers(model)]
    assert len(losses) == 8 and all(loss is not None for loss in losses)
    torch.testing.assert_close(router_aux_loss(model), torch.stack(losses).sum())
    router_aux_loss(model).backward()
    assert all(layer.router.weight.grad.abs().max() > 0 for _, layer in moelora_layers(model))

    off = inject_moelora(build_tiny_model("llama"),
                         MoELoRAConfig(num_experts=4, rank=2, top_k=2, router_aux_loss_coef=0.0)).train()
    off(input_ids=input_ids())
    assert router_aux_loss(off) is None


@pytest.mark.parametrize("overrides,key", [
    ({"num_experts": 2, "top_k": 3}, "top_k"),
    ({"top_k": 0}, "top_k"),
    ({"rank": 0}, "rank"),
    ({"rank": -2}, "rank"),
    ({"rank": 2.0}, "rank"),
    ({"rank": True}, "rank"),
    ({"num_experts": 0}, "num_experts"),
    ({"alpha": 0}, "alpha"),
    ({"dropout": 1.0}, "dropout"),
    ({"dropout": -0.1}, "dropout"),
    ({"gate_rescale": "square"}, "gate_rescale"),
    ({"gate_rescale": None}, "gate_rescale"),
    ({"dropout_per_expert": 1}, "dropout_per_expert"),
    ({"router_aux_loss_coef": -1.0}, "router_aux_loss_coef"),
    ({"target_modules": []}, "target_modules"),
    ({"target_modules": ""}, "target_modules"),
    ({"target_modules": ["q_proj", ""]}, "target_modules"),
])
def test_config_validation(overrides, key):
    with pytest.raises(ValueError, match=f"moelora.{key}"):
        MoELoRAConfig(**overrides)


def test_config_accepts_valid_values():
    config = MoELoRAConfig(num_experts=4, rank=2, alpha=8, top_k=4, target_modules=("q_proj",), gate_rescale="none")
    assert config.scaling == 4.0 and config.routed_top_k is None and config.target_modules == ["q_proj"]
    assert MoELoRAConfig(num_experts=4, top_k=2).routed_top_k == 2
    assert MoELoRAConfig(**config.to_dict()) == config
