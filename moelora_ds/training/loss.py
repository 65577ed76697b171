"""Next-token loss with the output head applied only where it is needed.

With the loss on answer tokens only (prompt tokens masked), most logits a causal LM computes are thrown
away: the output head (vocabulary x hidden, 49152 x 576 for SmolLM2) is about a fifth of the model's
matmul work. Hugging Face causal LMs take `logits_to_keep` (a tensor of sequence positions), so the head
runs only at the positions that predict a labelled token (their union over the batch). Models whose
forward has no `logits_to_keep` get the full logits; the result is the same either way.

Batches arrive on the CPU (collate.pad_batch). What the host must know about them (the positions, whether a
mask is needed) is read from the CPU tensors with numpy, which cannot touch device memory, and only then
are they moved to the device (`host_to_device`: staged in pinned memory and copied asynchronously, since a
copy from pageable memory waits for the device's queue): computing the loss reads nothing back from the device.

With `chunk_tokens` the labelled tokens' loss goes through the output head in chunks (chunked_loss.py): only the
labelled (row, position) pairs, and never the full-vocabulary logits of all of them at once.
"""

from __future__ import annotations

import inspect
from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

from moelora_ds.data.collate import IGNORE_INDEX
from moelora_ds.training.chunked_loss import chunkable_head, head_computes_loss


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether `model.forward` (the wrapped module's, under DeepSpeed) takes `logits_to_keep`."""
    module = getattr(model, "module", model)
    return "logits_to_keep" in inspect.signature(module.forward).parameters


def model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs must go: the parameters' device, or the accelerator's for ZeRO-3 partitioned ones."""
    parameter = next(model.parameters())
    if hasattr(parameter, "ds_id"):
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())
    return parameter.device


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU `tensor` on `device`, copied without making the host wait for the device (pinned, non-blocking)."""
    if device.type == "cpu":
        return tensor
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().pin_memory(tensor).to(device, non_blocking=True)


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions t whose next token (t + 1) is labelled in any row of `labels` (batch, seq; on the CPU)."""
    labelled = labels.numpy()[:, 1:] != IGNORE_INDEX
    return torch.from_numpy(np.flatnonzero(labelled.any(axis=0)))


def labelled_tokens(labels: torch.Tensor) -> int:
    """How many tokens of a CPU `labels` batch the loss is taken over (labelled, after the shift by one)."""
    return int(np.count_nonzero(labels.numpy()[:, 1:] != IGNORE_INDEX))


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict:
    """The model's keyword arguments for a CPU batch: all but the labels, the attention mask only where it is needed.

    Packed rows (they carry `position_ids`) go without mask and without cache: transformers then attends
    within each example of a row only (block-diagonal, from the restarting positions), where the 2-D mask
    would let every token attend to the examples before it in its row; padding sits at the row ends,
    unlabelled. A batch without padding goes without its all-ones mask: transformers then reads no mask
    values back to the host.
    """
    inputs: dict = {k: v for k, v in batch.items() if k != "labels"}
    mask = inputs.get("attention_mask")
    if "position_ids" in inputs:
        del inputs["attention_mask"]
        inputs["use_cache"] = False
    elif mask is not None and mask.numpy().all():
        del inputs["attention_mask"]
    return inputs


def logits_at(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor],
              positions: Optional[torch.Tensor]) -> torch.Tensor:
    """Logits (batch, len(positions), vocab) at `positions`, or at every position when `positions` is None."""
    if positions is None:
        return model(**inputs).logits
    if accepts_logits_to_keep(model):
        return model(**inputs, logits_to_keep=positions).logits
    return model(**inputs).logits[:, positions]


def supervised_logits_and_targets(model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
                                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits (N, vocab) and their targets (N,) (IGNORE_INDEX where unlabelled) at the predicting positions of a
    CPU `batch`, computed on `device`."""
    positions = predicting_positions(batch["labels"])
    targets = host_to_device(batch["labels"][:, positions + 1], device)
    inputs = {k: host_to_device(v, device) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
    logits = logits_at(model, inputs, host_to_device(positions, device)).float()
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)


def labelled_loss_sum(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], device: torch.device,
                      chunk_tokens: int = 0) -> tuple[torch.Tensor, int]:
    """(summed next-token cross-entropy over the labelled tokens of a CPU `batch`, fp32 on `device`; their number).

    `chunk_tokens` > 0 computes it through the output head in chunks of that many tokens where the model's head
    allows it (chunked_loss.chunkable_head), else from the logits at the predicting positions."""
    module = getattr(model, "module", model)
    head = chunkable_head(module) if chunk_tokens > 0 and accepts_logits_to_keep(model) else None
    if head is None:
        logits, targets = supervised_logits_and_targets(model, batch, device)
        return (F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"),
                labelled_tokens(batch["labels"]))
    positions = predicting_positions(batch["labels"])
    flat = batch["labels"][:, positions + 1].reshape(-1)
    index = torch.from_numpy(np.flatnonzero(flat.numpy() != IGNORE_INDEX))
    inputs = {k: host_to_device(v, device) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
    with head_computes_loss(head, host_to_device(index, device), host_to_device(flat[index], device), chunk_tokens):
        loss_sum = model(**inputs, logits_to_keep=host_to_device(positions, device)).logits
    return loss_sum, len(index)


def causal_lm_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], device: Optional[torch.device] = None,
                   reduction: str = "mean", chunk_tokens: int = 0) -> torch.Tensor:
    """Next-token cross-entropy over the labelled tokens of a CPU `batch`, computed on `device` (default: the model's):
    their mean (as the model's own `.loss`) or, with `reduction="sum"`, their sum; through the output head in chunks
    of `chunk_tokens` when > 0."""
    loss_sum, labelled = labelled_loss_sum(model, batch, device or model_device(model), chunk_tokens)
    return loss_sum if reduction == "sum" else loss_sum / labelled
