"""moelora-ds: mixture-of-LoRA-experts adapters with Riemannian preconditioning, trained under DeepSpeed."""

from moelora_ds.adapters.adamw import AdamWNoBiasCorrection
from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.inject import adapter_parameters, inject_moelora, moelora_layers, router_aux_loss
from moelora_ds.adapters.io import load_adapter
from moelora_ds.adapters.layer import MoELoRALinear
from moelora_ds.adapters.optimizer import create_riemannian_optimizer, set_preconditioning

__all__ = [
    "AdamWNoBiasCorrection",
    "MoELoRAConfig",
    "MoELoRALinear",
    "adapter_parameters",
    "create_riemannian_optimizer",
    "inject_moelora",
    "load_adapter",
    "moelora_layers",
    "router_aux_loss",
    "set_preconditioning",
]
__version__ = "0.1.0"
