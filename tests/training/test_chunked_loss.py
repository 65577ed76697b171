"""The loss through the output head in chunks: the same loss and gradients as the full logits, at fp32 rounding,
with no tensor the size of all labelled tokens x vocabulary ever allocated."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.inject import adapter_parameters, inject_moelora
from moelora_ds.data.collate import pack_examples, pad_batch
from moelora_ds.data.tokenization import tokenize_records
from moelora_ds.training.chunked_loss import chunkable_head, linear_cross_entropy_sum
from moelora_ds.training.loss import causal_lm_loss, labelled_loss_sum

from conftest import build_tiny_model, multiple_choice_records

VOCAB = 320


def adapted_model(arch: str = "llama") -> torch.nn.Module:
    model = inject_moelora(build_tiny_model(arch, seed=2).float(),
                           MoELoRAConfig(num_experts=4, rank=4, top_k=2, dropout=0.0, router_noise=0.0), seed=1)
    with torch.no_grad():
        for name, param in adapter_parameters(model).items():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(3))
    return model.train()


def loss_and_grads(model, batch, chunk_tokens):
    model.zero_grad()
    loss = causal_lm_loss(model, batch, chunk_tokens=chunk_tokens)
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in adapter_parameters(model).items()}


def batches(tokenizer) -> dict[str, dict]:
    examples, _ = tokenize_records(multiple_choice_records(9, seed=5), "chat", tokenizer, 64)
    full_text = [{"input_ids": e["input_ids"], "labels": e["input_ids"]} for e in examples[:3]]
    return {"answers": pad_batch(examples, tokenizer.pad_token_id),
            "packed": pad_batch(pack_examples(examples, 96), tokenizer.pad_token_id),
            "every token": pad_batch(full_text, tokenizer.pad_token_id)}


@pytest.mark.parametrize("chunk_tokens", [1, 5, 4096])
@pytest.mark.parametrize("kind", ["answers", "packed", "every token"])
def test_chunked_loss_equals_full_logits(tiny_tokenizer, kind, chunk_tokens):
    model = adapted_model()
    batch = batches(tiny_tokenizer)[kind]
    full, full_grads = loss_and_grads(model, batch, chunk_tokens=0)
    chunked, chunked_grads = loss_and_grads(model, batch, chunk_tokens=chunk_tokens)
    # fp32: the same terms summed in another order (chunks), ~1e-7 relative per sum.
    assert chunked == pytest.approx(full, rel=1e-6)
    for name in full_grads:
        torch.testing.assert_close(chunked_grads[name], full_grads[name], rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for n, g in full_grads.items() if n.endswith("lora_A"))


def test_linear_cross_entropy_gradient_matches_autograd():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(7, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 50, (7,), generator=generator)
    total = linear_cross_entropy_sum(rows, weight, targets, 3)
    (grad,) = torch.autograd.grad(2.5 * total, rows)
    reference_rows = rows.detach().clone().requires_grad_(True)
    reference = torch.nn.functional.cross_entropy(reference_rows @ weight.t(), targets, reduction="sum")
    (reference_grad,) = torch.autograd.grad(2.5 * reference, reference_rows)
    # The logits are computed in fp32 (as the trainer's loss is), so fp32 rounding of float64 inputs.
    assert total.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-6)


class LargestVocabularyTensor(TorchDispatchMode):
    """The most rows any tensor ending in the vocabulary dimension had (logits and their softmax); views of the
    head's weight (vocab x hidden, transposed for the product) are not logits and not counted."""

    def __init__(self, head_weight: torch.Tensor) -> None:
        super().__init__()
        self.rows = 0
        self.weight_storage = head_weight.untyped_storage().data_ptr()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[-1] == VOCAB
                    and tensor.untyped_storage().data_ptr() != self.weight_storage):
                self.rows = max(self.rows, tensor.numel() // VOCAB)
        return out


def test_no_logits_beyond_one_chunk(tiny_tokenizer):
    model = adapted_model()
    batch = batches(tiny_tokenizer)["every token"]
    _, labelled = labelled_loss_sum(model, batch, torch.device("cpu"), 4096)
    with LargestVocabularyTensor(model.lm_head.weight) as full:
        causal_lm_loss(model, batch, chunk_tokens=0).backward()
    with LargestVocabularyTensor(model.lm_head.weight) as chunked:
        causal_lm_loss(model, batch, chunk_tokens=8).backward()
    assert full.rows >= labelled > 8
    assert chunked.rows <= 8


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    return model.requires_grad_(False)


def test_heads_that_rescale_their_logits_or_train_keep_the_full_path():
    assert chunkable_head(frozen(build_tiny_model("llama"))) is not None
    assert chunkable_head(frozen(build_tiny_model("gemma2"))) is None  # final_logit_softcapping
    assert chunkable_head(build_tiny_model("llama")) is None  # a trainable head
