"""Cross-entropy through the frozen output head in chunks of tokens, never holding the logits of all of them.

A causal LM's loss needs the logits of every labelled token over the whole vocabulary: with a 128k vocabulary
and 8 x 4,096 labelled tokens that is 8.4 GB in bf16, twice that in fp32, and as much again for their gradient.
Here the head's input rows are multiplied by its weight `chunk_tokens` rows at a time: each chunk's fp32 logits
give the chunk's summed loss and, since the head is frozen, at once the gradient of that sum with respect to the
rows ((softmax - one-hot) @ W), which is all backward needs. Peak memory: one chunk's logits (the softmax is
taken in place), plus the rows' gradient (tokens x hidden), instead of tokens x vocabulary.

The head stays in the model and the model's own forward calls it (`head_computes_loss`): only what the call
computes changes, the summed loss of the labelled rows instead of their logits, which the model then returns as its
`logits`. Every hook around the call runs as for the logits: ZeRO-3 gathers the head's weight for it and releases
it after, and its backward bookkeeping sees the head's output and input take part in backward, as they would.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(rows_i @ W^T, targets_i) computed `chunk` rows at a time, W frozen; d/d rows kept from forward."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        needs_grad = ctx.needs_input_grad[0]
        grad_rows = torch.empty_like(rows) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for start in range(0, rows.shape[0], chunk):
            logits = (rows[start:start + chunk] @ weight.t()).float()
            target = targets[start:start + chunk]
            picked = logits.gather(1, target.unsqueeze(1)).squeeze(1)
            # log-sum-exp in place, so the chunk's logits are the only (chunk, vocab) buffer
            top = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(top).exp_()
            sums = exps.sum(dim=-1)
            total += (top.squeeze(1) + sums.log() - picked).sum()
            if needs_grad:
                probs = exps.div_(sums.unsqueeze(1))
                probs[torch.arange(len(target), device=rows.device), target] -= 1.0
                grad_rows[start:start + chunk] = probs.to(weight.dtype) @ weight
        if needs_grad:
            ctx.save_for_backward(grad_rows)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_rows,) = ctx.saved_tensors
        return grad_rows * grad_total.to(grad_rows.dtype), None, None, None


def linear_cross_entropy_sum(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_tokens: int) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) of `rows` (N, hidden) through the frozen head `weight` (vocab, hidden)
    against `targets` (N,), `chunk_tokens` rows at a time."""
    return _LinearCrossEntropySum.apply(rows, weight, targets, chunk_tokens)


def chunkable_head(model: nn.Module) -> Optional[nn.Linear]:
    """The model's output head when the chunked loss computes what its forward would: a frozen bias-free nn.Linear
    whose logits the model does not rescale or soft-cap afterwards; else None."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    config = getattr(model, "config", None)
    rescaled = any(getattr(config, key, None) not in (None, 1, 1.0)
                   for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad or rescaled:
        return None
    return head


@contextmanager
def head_computes_loss(head: nn.Linear, index: torch.Tensor, targets: torch.Tensor,
                       chunk_tokens: int) -> Iterator[None]:
    """While inside, a call of `head` on rows (batch, positions, hidden) returns the summed cross-entropy (an fp32
    scalar) of the rows `index` (into the flattened batch x positions) against `targets`, not logits."""

    def summed_loss(hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        return linear_cross_entropy_sum(rows, head.weight, targets, chunk_tokens)

    head.forward = summed_loss
    try:
        yield
    finally:
        del head.forward
