"""Training records: loading them from disk, checking their format, and tokenizing them as configured.

Three record formats are understood:
- "chat": `{"messages": [{"role": ..., "content": ...}, ...]}` with at least one assistant turn;
- "prompt_completion": `{"prompt": str, "completion": str}`;
- "text": `{"text": str}`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

from moelora_ds.data.tokenization import tokenize_records

FORMATS = ("chat", "prompt_completion", "text")
_FORMAT_KEYS = {"chat": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}
_LOADERS = {".json": "from_json", ".jsonl": "from_json", ".parquet": "from_parquet", ".csv": "from_csv"}


class DataError(ValueError):
    """Training data that cannot be used; the message names the file (and line or record) at fault."""


def load_records(path: str, format: str = "auto") -> tuple[list[dict], str]:
    """Load every record of a .json/.jsonl/.parquet/.csv file or a `datasets.save_to_disk` directory.

    Returns the records (plain dicts) and the resolved format. Raises FileNotFoundError for a missing
    path and ValueError, naming the file (and line or record index), for anything unusable.
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected 'auto' or one of {FORMATS}")
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    records = _read_records(source)
    if not records:
        raise ValueError(f"{path}: the data set is empty")
    resolved = _detect_format(records[0], path) if format == "auto" else format
    for index, record in enumerate(records):
        _validate_record(record, resolved, f"{path}: record {index}")
    return records, resolved


def tokenize_as_configured(records: Sequence[dict], fmt: str, tokenizer, data) -> tuple[list[dict], dict]:
    """`tokenize_records` with a DataConfig's max_length, overlong policy and eos labelling (train_on_eos)."""
    return tokenize_records(records, fmt, tokenizer, data.max_length, data.overlong, label_eos=data.train_on_eos)


def _read_records(source: Path) -> list[dict]:
    import datasets

    if source.is_dir():
        try:
            loaded = datasets.load_from_disk(str(source))
        except FileNotFoundError as error:
            raise ValueError(f"{source}: a directory that is not a datasets.save_to_disk data set ({error})") from error
        if isinstance(loaded, datasets.DatasetDict):
            if len(loaded) != 1:
                raise ValueError(f"{source}: a DatasetDict with splits {sorted(loaded)}; save a single split")
            loaded = next(iter(loaded.values()))
        return loaded.to_list()
    loader = _LOADERS.get(source.suffix.lower())
    if loader is None:
        raise ValueError(f"{source}: unsupported file type {source.suffix!r}; expected one of {sorted(_LOADERS)} "
                         f"or a datasets.save_to_disk directory")
    if source.suffix.lower() == ".jsonl" and _validate_jsonl(source) == 0:
        return []
    try:
        with _quiet_datasets():
            return getattr(datasets.Dataset, loader)(str(source), keep_in_memory=True).to_list()
    except Exception as error:  # pyarrow/datasets raise many types; the file name is what the user needs
        if "corresponds to no data" in str(error):  # how datasets reports a file without rows
            return []
        raise ValueError(f"{source}: could not be loaded by datasets: {error}") from error


def _validate_jsonl(source: Path) -> int:
    """Check that every non-blank line is a JSON object; returns the number of records."""
    count = 0
    with open(source, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source}:{number}: line {number} is not valid JSON ({error.msg})") from error
            if not isinstance(value, dict):
                raise ValueError(f"{source}:{number}: line {number} is a JSON {type(value).__name__}, not an object")
            count += 1
    return count


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _detect_format(record: dict, path: str) -> str:
    for name in FORMATS:
        if all(key in record for key in _FORMAT_KEYS[name]):
            return name
    raise ValueError(f"{path}: cannot detect the data format from the keys {sorted(record)}; expected 'messages' "
                     f"(chat), 'prompt' and 'completion' (prompt_completion), or 'text' (text)")


def _validate_record(record: dict, format: str, where: str) -> None:
    missing = [key for key in _FORMAT_KEYS[format] if record.get(key) is None]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing} required by the {format!r} format")
    if format != "chat":
        for key in _FORMAT_KEYS[format]:
            if not isinstance(record[key], str):
                raise ValueError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
        return
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {turn} needs a string 'role' and a string 'content'")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"{where}: chat record has no assistant turn (nothing to learn from)")
