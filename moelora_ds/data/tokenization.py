"""Records -> examples: token ids with loss labels only where the model should learn to write.

- chat: rendered with the tokenizer's chat template; labels on each assistant turn's content and its
  end-of-turn token (the tokenizer's eos token when the template closes the turn with it), -100 on
  everything else (system, user, the role headers, the template's whitespace after end-of-turn).
- prompt_completion: tokenizer(prompt) (special tokens such as BOS included) followed by the completion
  and eos; labels on the completion and eos.
- text: tokenizer(text) followed by eos; labels on every token.
With `label_eos=False` the end-of-turn / eos token stays in the input but gets label -100, so the loss is
on the answer's own tokens only (for a one-letter answer, the letter).
"""

from __future__ import annotations

from typing import Sequence

from moelora_ds.data.collate import IGNORE_INDEX
from moelora_ds.telemetry.progress import progress

OVERLONG_POLICIES = ("truncate", "drop", "error")


def tokenize_records(records: Sequence[dict], format: str, tokenizer, max_length: int,
                     overlong: str = "truncate", label_eos: bool = True) -> tuple[list[dict], dict]:
    """Tokenize records of one format into examples `{"input_ids": [...], "labels": [...]}`.

    `overlong` decides about an example longer than `max_length`: "truncate" keeps its first max_length
    tokens, "drop" skips it, "error" raises ValueError naming the record and its length. A truncated
    example left without any label (its answer was cut off) cannot train anything and is dropped.
    `label_eos=False` masks the eos / end-of-turn tokens' labels.
    Returns the examples and {"examples", "truncated", "dropped"} counts.
    """
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"unknown overlong policy {overlong!r}; expected one of {OVERLONG_POLICIES}")
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    encode = {"chat": _chat_example, "prompt_completion": _prompt_completion_example, "text": _text_example}.get(format)
    if encode is None:
        raise ValueError(f"unknown data format {format!r}; expected chat, prompt_completion or text")
    examples: list[dict] = []
    truncated = dropped = 0
    for index, record in progress(enumerate(records), desc="tokenize", total=len(records), unit="record"):
        input_ids, labels = encode(record, tokenizer, index)
        if not label_eos:
            labels = [IGNORE_INDEX if token == tokenizer.eos_token_id else label
                      for token, label in zip(input_ids, labels)]
            if all(label == IGNORE_INDEX for label in labels):
                raise ValueError(f"record {index} has no answer token besides eos, so with the eos label off "
                                 f"(data.train_on_eos: false) there is nothing to learn from it")
        if len(input_ids) > max_length:
            if overlong == "error":
                raise ValueError(f"record {index} is {len(input_ids)} tokens long, more than max_length={max_length} "
                                 f"(raise max_length, or set overlong to 'truncate' or 'drop')")
            if overlong == "drop":
                dropped += 1
                continue
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            if all(label == IGNORE_INDEX for label in labels):
                dropped += 1
                continue
            truncated += 1
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples, {"examples": len(examples), "truncated": truncated, "dropped": dropped}


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _text_example(record: dict, tokenizer, index: int) -> tuple[list[int], list[int]]:
    ids = _with_eos(tokenizer(record["text"], add_special_tokens=True)["input_ids"], tokenizer)
    return ids, list(ids)


def _prompt_completion_example(record: dict, tokenizer, index: int) -> tuple[list[int], list[int]]:
    prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
    completion = _with_eos(tokenizer(record["completion"], add_special_tokens=False)["input_ids"], tokenizer)
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


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
        through = render_chat(tokenizer, messages[:turn + 1])
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


def _chat_example(record: dict, tokenizer, index: int) -> tuple[list[int], list[int]]:
    messages = record["messages"]
    if not any(m.get("role") == "assistant" for m in messages):
        raise ValueError(f"record {index}: chat record has no assistant turn (nothing to learn from)")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("chat data needs a fast (Rust `tokenizers`) tokenizer to map characters to tokens")
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template; use prompt_completion or text data instead")
    text, spans = assistant_spans(tokenizer, messages, index)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [token if any(a < end and b > start for start, end in spans) else IGNORE_INDEX
              for token, (a, b) in zip(input_ids, encoded["offset_mapping"])]
    return input_ids, labels
