"""Records -> examples: token ids with loss labels only where the model should learn to write.

- chat: rendered with the tokenizer's chat template; labels on each assistant turn's content and its
  end-of-turn token (the tokenizer's eos token when the template closes the turn with it), -100 on
  everything else (system, user, the role headers, the template's whitespace after end-of-turn).
- prompt_completion: tokenizer(prompt) (special tokens such as BOS included) followed by the completion
  and eos; labels on the completion and eos.
- text: tokenizer(text) followed by eos; labels on every token.
With `label_eos=False` the end-of-turn / eos token stays in the input but gets label -100, so the loss is
on the answer's own tokens only (for a one-letter answer, the letter).
The tokenizer is called once per batch of records (`tokenize_batch`), as the prepared-data cache builds them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from moelora_ds.data.collate import IGNORE_INDEX

OVERLONG_POLICIES = ("truncate", "drop", "error")
TOKEN_DTYPE = np.int32
"""Token ids as stored and batched by the prepared-data cache (every vocabulary fits)."""


def tokenize_records(records: Sequence[dict], format: str, tokenizer, max_length: int,
                     overlong: str = "truncate", label_eos: bool = True) -> tuple[list[dict], dict]:
    """Tokenize records of one format into examples `{"input_ids": [...], "labels": [...]}`.

    `overlong` decides about an example longer than `max_length`: "truncate" keeps its first max_length
    tokens, "drop" skips it, "error" raises ValueError naming the record and its length. A truncated
    example left without any label (its answer was cut off) cannot train anything and is dropped.
    `label_eos=False` masks the eos / end-of-turn tokens' labels.
    Returns the examples and {"examples", "truncated", "dropped"} counts.
    """
    encoded, truncated, dropped = tokenize_batch(records, format, tokenizer, max_length, overlong, label_eos)
    examples = [{"input_ids": ids.tolist(), "labels": np.where(labelled, ids, IGNORE_INDEX).tolist()}
                for ids, labelled in encoded]
    return examples, {"examples": len(examples), "truncated": truncated, "dropped": dropped}


def tokenize_batch(records: Sequence[dict], format: str, tokenizer, max_length: int, overlong: str = "truncate",
                   label_eos: bool = True, first_index: int = 0) -> tuple[list[tuple[np.ndarray, np.ndarray]], int, int]:
    """`tokenize_records` as arrays, with the tokenizer called once on the whole batch.

    Returns each kept example as (token ids, labelled) arrays (TOKEN_DTYPE, bool; a labelled token's label
    is the token itself, every other label is -100) and the truncated and dropped counts. Errors name a
    record by `first_index` + its position in `records`.
    """
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"unknown overlong policy {overlong!r}; expected one of {OVERLONG_POLICIES}")
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    encode = {"chat": _chat_examples, "prompt_completion": _prompt_completion_examples,
              "text": _text_examples}.get(format)
    if encode is None:
        raise ValueError(f"unknown data format {format!r}; expected chat, prompt_completion or text")
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    truncated = dropped = 0
    for offset, (input_ids, labelled) in enumerate(encode(records, tokenizer, first_index)):
        index = first_index + offset
        ids = np.asarray(input_ids, dtype=TOKEN_DTYPE)
        labelled = np.asarray(labelled, dtype=bool)
        if not label_eos:
            if tokenizer.eos_token_id is not None:
                labelled &= ids != tokenizer.eos_token_id
            if not labelled.any():
                raise ValueError(f"record {index} has no answer token besides eos, so with the eos label off "
                                 f"(data.train_on_eos: false) there is nothing to learn from it")
        if len(ids) > max_length:
            if overlong == "error":
                raise ValueError(f"record {index} is {len(ids)} tokens long, more than max_length={max_length} "
                                 f"(raise max_length, or set overlong to 'truncate' or 'drop')")
            if overlong == "drop" or not labelled[:max_length].any():
                dropped += 1
                continue
            ids, labelled = ids[:max_length], labelled[:max_length]
            truncated += 1
        kept.append((ids, labelled))
    return kept, truncated, dropped


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _text_examples(records: Sequence[dict], tokenizer, first_index: int) -> list[tuple[list[int], list[bool]]]:
    encoded = tokenizer([record["text"] for record in records], add_special_tokens=True)["input_ids"]
    return [(ids, [True] * len(ids)) for ids in (_with_eos(ids, tokenizer) for ids in encoded)]


def _prompt_completion_examples(records: Sequence[dict], tokenizer,
                                first_index: int) -> list[tuple[list[int], list[bool]]]:
    prompts = tokenizer([record["prompt"] for record in records], add_special_tokens=True)["input_ids"]
    completions = tokenizer([record["completion"] for record in records], add_special_tokens=False)["input_ids"]
    examples = []
    for prompt, completion in zip(prompts, completions):
        completion = _with_eos(completion, tokenizer)
        examples.append((prompt + completion, [False] * len(prompt) + [True] * len(completion)))
    return examples


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages` (None-valued keys, as datasets fills them in, removed)."""
    cleaned = [{key: value for key, value in m.items() if value is not None} for m in messages]
    return tokenizer.apply_chat_template(cleaned, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], index: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the model should write.

    The span of assistant turn i starts where rendering messages[:i] with the generation prompt ends
    and ends where rendering messages[:i+1] ends, cut back to just after the last eos token inside it
    (so the end-of-turn token is learned but the template's trailing newline is not). This works for
    any template that renders a conversation's prefixes as prefixes of its full text; one that does not
    is an error.
    """
    full = render_chat(tokenizer, messages)
    eos = tokenizer.eos_token
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:turn], add_generation_prompt=True) if turn else ""
        through = full if turn + 1 == len(messages) else render_chat(tokenizer, messages[:turn + 1])
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise ValueError(f"record {index}: the chat template does not render the conversation up to message "
                             f"{turn} as a prefix of the whole conversation, so the assistant tokens cannot be "
                             f"located")
        start, end = len(before), len(through)
        if eos:
            found = full.rfind(eos, start, end)
            if found >= 0:
                end = found + len(eos)
        spans.append((start, end))
    return full, spans


def _chat_examples(records: Sequence[dict], tokenizer, first_index: int) -> list[tuple[list[int], np.ndarray]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("chat data needs a fast (Rust `tokenizers`) tokenizer to map characters to tokens")
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template; use prompt_completion or text data instead")
    texts, all_spans = [], []
    for offset, record in enumerate(records):
        messages = record["messages"]
        if not any(m.get("role") == "assistant" for m in messages):
            raise ValueError(f"record {first_index + offset}: chat record has no assistant turn (nothing to learn from)")
        text, spans = assistant_spans(tokenizer, messages, first_index + offset)
        texts.append(text)
        all_spans.append(spans)
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    examples = []
    for input_ids, offsets, spans in zip(encoded["input_ids"], encoded["offset_mapping"], all_spans):
        bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        labelled = np.zeros(len(input_ids), dtype=bool)
        for start, end in spans:
            labelled |= (bounds[:, 0] < end) & (bounds[:, 1] > start)
        examples.append((input_ids, labelled))
    return examples
