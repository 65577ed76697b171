"""The loss with the output head applied only at predicting positions equals the model's own loss."""

from __future__ import annotations

import pytest
import torch

from moelora_ds.data.collate import IGNORE_INDEX
from moelora_ds.lm_loss import accepts_logits_to_keep, causal_lm_loss, logits_at, predicting_positions

from conftest import build_tiny_model


class WithoutLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no `logits_to_keep` (the fallback path)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def answer_only_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows whose labels cover only their last two real tokens, at different positions."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [12, 7, 10]
    input_ids = torch.randint(3, 300, (3, 12), generator=generator)
    attention_mask = torch.zeros(3, 12, dtype=torch.long)
    labels = torch.full((3, 12), IGNORE_INDEX)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
        labels[row, length - 2:length] = input_ids[row, length - 2:length]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("wrapped", [False, True])
def test_loss_and_gradients_equal_the_models_own(arch, wrapped):
    model = build_tiny_model(arch, seed=1)
    target = WithoutLogitsToKeep(model) if wrapped else model
    assert accepts_logits_to_keep(target) is not wrapped
    batch = answer_only_batch()
    ours = causal_lm_loss(target, batch)
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    theirs = model(**batch).loss
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    for mine, reference in zip(ours_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-7)


def test_only_predicting_positions_are_kept():
    batch = answer_only_batch()
    # rows of length 12, 7, 10 label positions (10, 11), (5, 6), (8, 9): predicted from 9, 10, 4, 5, 7, 8
    assert predicting_positions(batch["labels"]).tolist() == [4, 5, 7, 8, 9, 10]
    model = build_tiny_model("llama", seed=1)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    positions = torch.tensor([4, 9])
    torch.testing.assert_close(logits_at(model, inputs, positions), model(**inputs).logits[:, positions])
