"""MoE-LoRA causal LMs for `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.

Written next to `config.json` by `moelora-export --mode merged`; self-contained (torch and transformers
only, no moelora-ds). The loaded model is the base architecture's own transformers class, subclassed so
that the linear layers listed in `config.moelora["modules"]` are `MoELoRALinear` layers: weight names are
the base model's plus `<path>.lora_A` (E, r, in), `<path>.lora_B` (E, out, r) and `<path>.router.weight`
(E, in), and generation, weight tying and dtype handling are the base model's.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING


class MoELoRAConfig(PretrainedConfig):
    """The base model's configuration (`base_config`, with its `model_type`) plus the MoE-LoRA settings.

    `moelora`: `num_experts`, `rank`, `alpha`, `top_k` (null: dense routing) and `modules` (the paths of
    the adapted linear layers).
    """

    model_type = "moelora"

    def __init__(self, base_config: Optional[dict] = None, moelora: Optional[dict] = None, **kwargs) -> None:
        self.base_config = dict(base_config or {})
        self.moelora = dict(moelora or {})
        super().__init__(**kwargs)

    def to_base_config(self) -> PretrainedConfig:
        """The base architecture's own config class, carrying the MoE-LoRA settings as `moelora`."""
        settings = dict(self.base_config)
        if "model_type" not in settings:
            raise ValueError("MoELoRAConfig: base_config has no model_type")
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        config.moelora = dict(self.moelora)
        return config


class MoELoRALinear(nn.Module):
    """Inference form of a MoE-LoRA layer: `y = W x + b + (alpha/r) * sum_e g_e(x) B_e A_e x`.

    Gates: softmax of the router logits (in fp32 or better); with top-k, the k largest are kept and
    renormalised. The experts are computed stacked (two batched products), never in a Python loop.
    """

    def __init__(self, base: nn.Linear, num_experts: int, rank: int, alpha: float, top_k: Optional[int]) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_experts, self.rank = num_experts, rank
        self.scaling = alpha / rank
        self.top_k = top_k if top_k is not None and top_k < num_experts else None
        self.weight = base.weight
        self.bias = base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_experts, self.out_features, rank, **factory))
        self.router = nn.Linear(self.in_features, num_experts, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = F.linear(x, self.weight, self.bias)
        tokens = x.reshape(-1, self.in_features)
        logits = self.router(tokens)
        gates = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        if self.top_k is not None:
            kept, index = gates.topk(self.top_k, dim=-1)
            gates = torch.zeros_like(gates).scatter(-1, index, kept / kept.sum(dim=-1, keepdim=True))
        h = (tokens @ self.lora_A.reshape(-1, self.in_features).t()).view(-1, self.num_experts, self.rank)
        lora_out = torch.einsum("ner,eor->no", gates.to(h.dtype).unsqueeze(-1) * h, self.lora_B)
        return base_out + self.scaling * lora_out.view(*x.shape[:-1], self.out_features).to(base_out.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, rank={self.rank}, "
                f"top_k={self.top_k}")


class _MoELoRAMixin:
    """Builds the base architecture, then swaps the configured nn.Linear modules for MoELoRALinear."""

    def __init__(self, config: PretrainedConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        settings = config.moelora
        for path in settings["modules"]:
            parent_path, _, child = path.rpartition(".")
            parent = self.get_submodule(parent_path) if parent_path else self
            linear = getattr(parent, child, None)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"moelora.modules: {path!r} is not an nn.Linear in {type(self).__name__}")
            setattr(parent, child, MoELoRALinear(linear, settings["num_experts"], settings["rank"],
                                                 settings["alpha"], settings.get("top_k")))


_ADAPTED_CLASSES: dict[type, type] = {}


def adapted_class(base_config: PretrainedConfig) -> type:
    """The base architecture's causal-LM class with MoE-LoRA layers (one class per base class)."""
    base_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(base_config)]
    if base_class not in _ADAPTED_CLASSES:
        _ADAPTED_CLASSES[base_class] = type(f"MoELoRA{base_class.__name__}", (_MoELoRAMixin, base_class),
                                            {"__module__": __name__})
    return _ADAPTED_CLASSES[base_class]


class MoELoRAForCausalLM(PreTrainedModel):
    """What config.json's `auto_map` names: `from_pretrained` and `from_config` build `adapted_class`."""

    config_class = MoELoRAConfig

    def __init__(self, config: MoELoRAConfig, *args, **kwargs) -> None:
        raise TypeError("build MoELoRAForCausalLM with from_pretrained(DIR) or AutoModelForCausalLM.from_config")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        if not isinstance(config, MoELoRAConfig):
            config = MoELoRAConfig.from_pretrained(pretrained_model_name_or_path)
        base_config = config.to_base_config()
        return adapted_class(base_config).from_pretrained(pretrained_model_name_or_path, *model_args,
                                                          config=base_config, **kwargs)

    @classmethod
    def _from_config(cls, config: MoELoRAConfig, **kwargs):
        base_config = config.to_base_config()
        return adapted_class(base_config)._from_config(base_config, **kwargs)
