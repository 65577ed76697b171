"""The MoE-LoRA adapter library: config, layer, injection, Riemannian optimizer, merging and the adapter format.

Nothing here imports DeepSpeed or the training configuration: this is the part people embed.
"""

from moelora_ds.adapters.adamw import AdamWNoBiasCorrection
from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.inject import adapter_parameters, inject_moelora, moelora_layers, router_aux_loss
from moelora_ds.adapters.io import load_adapter, save_adapter
from moelora_ds.adapters.layer import MoELoRALinear
from moelora_ds.adapters.merge import merge
from moelora_ds.adapters.optimizer import create_riemannian_optimizer, set_preconditioning

__all__ = ["AdamWNoBiasCorrection", "MoELoRAConfig", "MoELoRALinear", "adapter_parameters",
           "create_riemannian_optimizer", "inject_moelora", "load_adapter", "merge", "moelora_layers",
           "router_aux_loss", "save_adapter", "set_preconditioning"]
