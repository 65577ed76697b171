"""Named target sets (`attention`, `mlp`) resolved to the nn.Linear names of each model family."""

from __future__ import annotations

from torch import nn

PRESETS = ("attention", "mlp")
"""The values of `moelora.target_modules` that name a part of every decoder layer rather than modules."""

_LLAMA_STYLE = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
FAMILY_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    **{family: _LLAMA_STYLE for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
                                           "gemma3_text", "granite", "smollm3")},
    "phi3": {"attention": ("qkv_proj", "o_proj"), "mlp": ("gate_up_proj", "down_proj")},
    "gpt_neox": {"attention": ("query_key_value", "dense"), "mlp": ("dense_h_to_4h", "dense_4h_to_h")},
}
"""Module-name suffixes of each preset by `config.model_type` (Hugging Face's names for the family)."""

_PARENT_WORDS = {"attention": ("attn", "attention"), "mlp": ("mlp", "feed_forward", "ffn")}
"""For a family not in FAMILY_TARGETS: a linear belongs to a preset when its parent module's name contains one of
these words (`model.layers.0.self_attn.q_proj` is attention, `model.layers.0.mlp.up_proj` is mlp)."""


def _language_model_linears(model: nn.Module) -> list[str]:
    """Paths of the nn.Linear modules of the text decoder: a multimodal model's vision or audio towers left out."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    text = [name for name in linears if "language_model" in name.split(".")]
    return text or linears


def preset_linears(model: nn.Module, preset: str) -> list[str]:
    """Paths of the nn.Linear modules that `preset` ("attention" or "mlp") names in this model's family."""
    if preset not in PRESETS:
        raise ValueError(f"moelora.target_modules: unknown preset {preset!r}; expected one of {PRESETS}")
    family = getattr(getattr(model, "config", None), "model_type", None)
    linears = _language_model_linears(model)
    if family in FAMILY_TARGETS:
        names = FAMILY_TARGETS[family][preset]
        chosen = [path for path in linears if path.rsplit(".", 1)[-1] in names]
    else:
        words = _PARENT_WORDS[preset]
        parent = lambda path: path.rsplit(".", 2)[-2].lower() if "." in path else ""
        chosen = [path for path in linears if any(word in parent(path) for word in words)]
    if not chosen:
        candidates = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ValueError(f"moelora.target_modules: {preset!r} finds no nn.Linear in {type(model).__name__} "
                         f"(model_type {family!r}); list the module names instead, from: {candidates}")
    return chosen
