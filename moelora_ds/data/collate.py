"""Turning tokenized examples into tensors: right-padding and greedy packing.

An *example* is a mapping with `input_ids` and `labels` (equal-length lists of ints; label -100 means
"no loss here"). A packed *row* additionally carries `position_ids` that restart at 0 at every example
boundary.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

IGNORE_INDEX = -100
"""Label value that the Hugging Face loss (and `evaluate_loss`) ignores."""

Example = Mapping[str, Sequence[int]]


def pad_batch(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `examples` to the longest one.

    Returns torch.long tensors `input_ids` (pad_token_id on padding), `attention_mask` (1 on real tokens),
    `labels` (-100 on padding) and, when the examples carry them (packed rows), `position_ids`; on padding
    these count up from 0 as one more segment, so packed-sequence detection never merges the padding into
    the last real example.
    """
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    width = max(len(e["input_ids"]) for e in examples)
    with_positions = "position_ids" in examples[0]
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        if len(example["labels"]) != n:
            raise ValueError(f"example {row}: {n} input_ids but {len(example['labels'])} labels")
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
        if with_positions:
            position_ids[row, :n] = torch.tensor(example["position_ids"], dtype=torch.long)
            position_ids[row, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if with_positions:
        batch["position_ids"] = position_ids
    return batch


def pack_examples(examples: Sequence[Example], max_length: int) -> list[dict[str, list[int]]]:
    """Pack examples, in the given order, greedily (next fit) into rows of at most `max_length` tokens.

    Every example starts a new segment: its `position_ids` restart at 0 and its first label is -100, so
    no token is trained to predict the first token of the *next* example. Examples longer than
    `max_length` are an error (tokenize with the same max_length first).

    Attention: with a 2-D `attention_mask` the Hugging Face attention is only causal, so a token would
    attend to the earlier examples of its row; transformers (>= 4.53, checked with 5.24) builds a
    block-diagonal mask from restarting `position_ids` when the model is called *without* `attention_mask`
    and with `use_cache=False`, which is exact for these rows (padding is at the row end and carries label
    -100), and training/loss.model_inputs calls it so; flash-attention-2 does the same through its varlen path.
    """
    rows: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for index, example in enumerate(examples):
        n = len(example["input_ids"])
        if n == 0 or n > max_length:
            raise ValueError(f"example {index} has {n} tokens; packing needs 1..max_length={max_length}")
        if len(current["input_ids"]) + n > max_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"].extend(example["input_ids"])
        current["labels"].extend([IGNORE_INDEX, *example["labels"][1:]])
        current["position_ids"].extend(range(n))
    if current["input_ids"]:
        rows.append(current)
    return rows
