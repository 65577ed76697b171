"""The loss with the output head applied only at predicting positions equals the model's own loss."""

from __future__ import annotations

import pytest
import torch

from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.inject import adapter_parameters, inject_moelora
from moelora_ds.data.collate import IGNORE_INDEX, pack_examples, pad_batch
from moelora_ds.data.tokenization import tokenize_records
from moelora_ds.training.loss import accepts_logits_to_keep, causal_lm_loss, logits_at, predicting_positions

from conftest import build_tiny_model, multiple_choice_records


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


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_batch_has_the_loss_of_its_samples_unpacked(tiny_tokenizer, attention):
    """Packed rows (data.packing) give the loss and adapter gradients of the same samples padded one per row: no
    token attends to another example of its row (the trainer's path, MoE-LoRA injected, fp32), with either
    attention model.attn_implementation chooses by itself."""
    examples, _ = tokenize_records(multiple_choice_records(12, seed=5), "chat", tiny_tokenizer, 64)
    rows = pack_examples(examples, 96)
    assert len(rows) < len(examples) and any(len(r["input_ids"]) < max(len(q["input_ids"]) for q in rows)
                                             for r in rows)  # several examples per row, and padded rows
    adapters = MoELoRAConfig(num_experts=4, rank=4, top_k=2, dropout=0.0, router_noise=0.0)
    model = inject_moelora(build_tiny_model("llama", seed=2).float(), adapters)
    model.set_attn_implementation(attention)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in adapter_parameters(model).items():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.2)
    model.train()
    results = []
    for batch in (pad_batch(rows, tiny_tokenizer.pad_token_id), pad_batch(examples, tiny_tokenizer.pad_token_id)):
        model.zero_grad()
        loss = causal_lm_loss(model, batch)
        loss.backward()
        results.append((loss.item(), {k: p.grad.clone() for k, p in adapter_parameters(model).items()}))
    (packed, packed_grads), (unpacked, unpacked_grads) = results
    assert packed == pytest.approx(unpacked, rel=1e-5)
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], unpacked_grads[name], rtol=1e-4, atol=1e-6)
    # With the rows' 2-D attention mask (all ones up to the padding) every token would also see the examples
    # before it in its row: a different loss, which is what the test would catch (by 10x the tolerance above).
    batch = pad_batch(rows, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        crossing = model(**{k: v for k, v in batch.items() if k != "position_ids"}).loss.item()
    assert abs(crossing - unpacked) > 10 * 1e-5 * unpacked
