"""Evaluation: token-level loss and multiple-choice accuracy, sharded over ranks.

Every rank runs the same number of forward passes (ranks whose shard is short run padding batches whose
results are discarded): under ZeRO-3 a forward pass gathers parameters collectively, so a rank that
skipped one would hang the others. Works with a plain `nn.Module`, a DeepSpeed engine, or an engine's
module; tensors go to the model's device (the accelerator's current device for ZeRO-3-partitioned
parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import torch

from moelora_ds.data.collate import IGNORE_INDEX, pad_batch
from moelora_ds.data.prepare import Preparation
from moelora_ds.data.records import load_records
from moelora_ds.data.shared import prepare_for_ranks
from moelora_ds.data.tokenization import render_chat
from moelora_ds.distributed.process_group import all_sum
from moelora_ds.telemetry.progress import progress
from moelora_ds.training.loss import labelled_loss_sum, logits_at, model_device


class _EvalMode:
    """`with _EvalMode(model):` eval mode and no autograd, restoring the previous mode afterwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.was_training = model, model.training
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def eval_batches(examples: Sequence[Mapping[str, Sequence[int]]], *, micro_batch_size: int, rank: int,
                 world_size: int, pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """This rank's share (every world_size-th example) of one pass over `examples`, in order.

    Every rank gets the same number of batches; a rank with nothing left gets a padding batch whose
    labels are all -100, so it adds nothing to the loss.
    """
    if not len(examples):
        raise ValueError("no examples to evaluate")
    mine = [examples[i] for i in range(rank, len(examples), world_size)]
    count = math.ceil(math.ceil(len(examples) / world_size) / micro_batch_size)
    batches = []
    for b in range(count):
        chunk = mine[b * micro_batch_size:(b + 1) * micro_batch_size]
        if not chunk:
            chunk = [{"input_ids": examples[0]["input_ids"], "labels": [IGNORE_INDEX] * len(examples[0]["labels"])}]
        batches.append(pad_batch(chunk, pad_token_id))
    return batches


def evaluate_loss(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                  world_size: int = 1, chunk_tokens: int = 0) -> float:
    """Mean next-token cross-entropy over all labelled tokens of `batches` (token-weighted, not batch-weighted),
    through the output head in chunks of `chunk_tokens` when > 0 (training/loss.py).

    With world_size > 1 the sums are all-reduced over the process group, so every rank must pass the
    same number of batches (as `eval_batches` gives). NaN when no token is labelled.
    """
    device = model_device(model)
    loss_sum, tokens = 0.0, 0
    with _EvalMode(model):
        for batch in progress(batches, desc="eval loss", unit="batch"):
            batch_sum, labelled = labelled_loss_sum(model, batch, device, chunk_tokens)
            loss_sum += float(batch_sum)
            tokens += labelled
    if world_size > 1:
        loss_sum, tokens = all_sum([loss_sum, float(tokens)], device)
    return loss_sum / tokens if tokens else float("nan")


def _split_multiple_choice(record: dict, choices: Sequence[str], index: int) -> tuple[list[dict], str]:
    messages = record.get("messages")
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"record {index}: a multiple-choice record is a chat ending with the assistant's answer")
    gold = (messages[-1].get("content") or "").strip()
    if gold not in choices:
        raise ValueError(f"record {index}: the answer {gold!r} is not one of the choices {list(choices)}")
    return messages[:-1], gold


def multiple_choice_answers(records: Sequence[dict], choices: Sequence[str]) -> list[str]:
    """Every record's answer, one of `choices`; ValueError when a record is not a chat ending with one."""
    return [_split_multiple_choice(record, choices, index)[1] for index, record in enumerate(records)]


def is_multiple_choice(records: Sequence[dict], choices: Sequence[str]) -> bool:
    """Whether every record is a chat whose final assistant answer is one of `choices`."""
    try:
        multiple_choice_answers(records, choices)
    except ValueError:
        return False
    return bool(records)


def choice_token_ids(tokenizer, prompt_text: str, choices: Sequence[str]) -> list[int]:
    """The token of each choice when written right after `prompt_text`, as the assistant's answer is.

    Each choice must be one token there, and the tokens distinct; otherwise ValueError.
    """
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids = []
    for choice in choices:
        full = tokenizer(prompt_text + choice, add_special_tokens=False)["input_ids"]
        if full[:len(prompt_ids)] != prompt_ids or len(full) != len(prompt_ids) + 1:
            raise ValueError(f"choice {choice!r} is not a single token after the prompt (it tokenizes to "
                             f"{full[len(prompt_ids) - 1:]} at the prompt's end); use single-token choices")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ValueError(f"the choices {list(choices)} do not tokenize to distinct tokens ({ids})")
    return ids


def _multiple_choice_prompts(tokenizer, records: Sequence[dict], choices: Sequence[str]):
    """(conversation, answer) of every record, its prompt rendered with the generation prompt, the choices' tokens."""
    if not records:
        raise ValueError("no records to evaluate")
    split = [_split_multiple_choice(record, choices, i) for i, record in enumerate(records)]
    prompts = [render_chat(tokenizer, messages, add_generation_prompt=True) for messages, _ in split]
    return split, prompts, choice_token_ids(tokenizer, prompts[0], choices)


def multiple_choice_predictions(model: torch.nn.Module, tokenizer, records: Sequence[dict],
                                choices: Sequence[str] = ("A", "B", "C", "D")) -> list[str]:
    """The choice the model picks for each record, scored as multiple_choice_accuracy scores (one process)."""
    _, prompts, token_ids = _multiple_choice_prompts(tokenizer, records, choices)
    with _EvalMode(model):
        return [choices[p] for p in _predict(model, tokenizer, prompts, token_ids, model_device(model))]


def multiple_choice_accuracy(model: torch.nn.Module, tokenizer, records: Sequence[dict],
                             choices: Sequence[str] = ("A", "B", "C", "D"), micro_batch_size: int = 8,
                             rank: int = 0, world_size: int = 1) -> dict:
    """Accuracy of the next-token prediction restricted to the choices' tokens.

    Each record is a chat ending with the assistant's answer (one of `choices`). The conversation before
    it is rendered with the generation prompt; the prediction is the choice whose first token has the
    highest logit at the next position. Rank r scores every world_size-th record; counts are summed
    over ranks. Returns {"accuracy", "correct", "total", "predicted"}, where "predicted" counts how often
    each choice was predicted (a model that always gives one letter shows as one non-zero count).
    """
    split, prompts, token_ids = _multiple_choice_prompts(tokenizer, records, choices)
    device = model_device(model)
    mine = list(range(rank, len(records), world_size))
    count = math.ceil(math.ceil(len(records) / world_size) / micro_batch_size)
    correct, predicted = 0, [0] * len(choices)
    with _EvalMode(model):
        for b in progress(range(count), desc="multiple choice", unit="batch"):
            chunk = mine[b * micro_batch_size:(b + 1) * micro_batch_size]
            predictions = _predict(model, tokenizer, [prompts[i] for i in chunk or [0]], token_ids, device)
            for i, p in zip(chunk, predictions):
                correct += choices[p] == split[i][1]
                predicted[p] += 1
    if world_size > 1:
        correct, *predicted = all_sum([float(correct), *map(float, predicted)], device)
    total = sum(predicted)  # every scored record has exactly one prediction
    return {"accuracy": correct / total, "correct": int(correct), "total": int(total),
            "predicted": {choice: int(n) for choice, n in zip(choices, predicted)}}


def _predict(model: torch.nn.Module, tokenizer, prompts: list[str], token_ids: list[int],
             device: torch.device) -> list[int]:
    encoded = [{"input_ids": ids, "labels": ids} for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    batch = pad_batch(encoded, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    last = batch["attention_mask"].sum(dim=1).to(device) - 1
    positions = last.unique()
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    logits = logits_at(model, inputs, positions)
    scores = logits[torch.arange(len(prompts), device=device), torch.searchsorted(positions, last)][:, token_ids]
    return scores.argmax(dim=-1).tolist()


def eval_records(data_config) -> tuple[list[dict], str]:
    """The records of `data_config.eval_path` (the first `eval_max_samples`) and their format."""
    records, fmt = load_records(data_config.eval_path, data_config.format)
    limit: Optional[int] = data_config.eval_max_samples
    return (records if limit is None else records[:limit]), fmt


@dataclass
class EvalSet:
    """A run's evaluation data, prepared once: the examples the loss is taken on (memory-mapped) and, for
    multiple-choice chat data, the records whose answers are scored (None otherwise)."""

    examples: Sequence[Mapping[str, Sequence[int]]]
    multiple_choice: Optional[list[dict]]
    choices: list[str]


def prepare_eval_set(data_config, tokenizer) -> EvalSet:
    """`data_config.eval_path` (its first `eval_max_samples` records) prepared through the data cache on every
    rank (data/shared.py); a DataError on every rank for bad input."""
    limit: Optional[int] = data_config.eval_max_samples
    examples = prepare_for_ranks(Preparation.of(data_config.eval_path, data_config, limit), tokenizer, data_config,
                                 "data.eval_path")
    records = None
    if examples.stats["format"] == "chat":
        records, _ = eval_records(data_config)
        if not is_multiple_choice(records, data_config.choices):
            records = None
    return EvalSet(examples, records, list(data_config.choices))


def evaluate_run(model: torch.nn.Module, eval_set: EvalSet, tokenizer, *, rank: int, world_size: int,
                 micro_batch_size: int, chunk_tokens: int = 0) -> dict:
    """The training run's evaluation of its prepared eval set: {"eval_loss"} and, for multiple-choice chat data,
    {"accuracy", "predicted"} (predictions per choice)."""
    batches = eval_batches(eval_set.examples, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
                           pad_token_id=tokenizer.pad_token_id)
    result = {"eval_loss": evaluate_loss(model, batches, world_size=world_size, chunk_tokens=chunk_tokens)}
    if eval_set.multiple_choice is not None:
        scores = multiple_choice_accuracy(model, tokenizer, eval_set.multiple_choice, eval_set.choices,
                                          micro_batch_size, rank, world_size)
        result.update(accuracy=scores["accuracy"], predicted=scores["predicted"])
    return result
