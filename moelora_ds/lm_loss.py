"""Next-token loss with the output head applied only where it is needed.

With the loss on answer tokens only (prompt tokens masked), most logits a causal LM computes are thrown
away: the output head (vocabulary x hidden, 49152 x 576 for SmolLM2) is about a fifth of the model's
matmul work. Hugging Face causal LMs take `logits_to_keep` (a tensor of sequence positions), so the head
runs only at the positions that predict a labelled token (their union over the batch). Models whose
forward has no `logits_to_keep` get the full logits; the result is the same either way.
"""

from __future__ import annotations

import inspect
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from moelora_ds.data.collate import IGNORE_INDEX


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether `model.forward` (the wrapped module's, under DeepSpeed) takes `logits_to_keep`."""
    module = getattr(model, "module", model)
    return "logits_to_keep" in inspect.signature(module.forward).parameters


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions t whose next token (t + 1) is labelled in any row of `labels` (batch, seq)."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def logits_at(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor],
              positions: Optional[torch.Tensor]) -> torch.Tensor:
    """Logits (batch, len(positions), vocab) at `positions`, or at every position when `positions` is None."""
    if positions is None:
        return model(**inputs).logits
    if accepts_logits_to_keep(model):
        return model(**inputs, logits_to_keep=positions).logits
    return model(**inputs).logits[:, positions]


def supervised_logits_and_targets(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor],
                                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits (N, vocab) and their targets (N,) (IGNORE_INDEX where unlabelled) at the predicting positions."""
    positions = predicting_positions(labels)
    logits = logits_at(model, inputs, positions).float()
    targets = labels[:, positions + 1]
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)


def causal_lm_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of `batch` (as the model's own `.loss`)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits, targets = supervised_logits_and_targets(model, inputs, batch["labels"])
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
