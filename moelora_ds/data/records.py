"""Training records: reading them from disk in chunks, checking their format.

Three record formats are understood:
- "chat": `{"messages": [{"role": ..., "content": ...}, ...]}` with at least one assistant turn;
- "prompt_completion": `{"prompt": str, "completion": str}`;
- "text": `{"text": str}`.

A data source is a .json/.jsonl/.parquet/.csv file or a `datasets.save_to_disk` directory. It is read as
`RecordChunk`s of consecutive records, so a large file never has to exist as Python dicts all at once:
a JSONL file line by line (its lines parsed when the chunk's records are asked for, possibly in a worker
process), the other forms through datasets' Arrow tables.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from moelora_ds.data.tokenization import tokenize_records

FORMATS = ("chat", "prompt_completion", "text")
CHUNK_RECORDS = 1000
"""Records per chunk: the unit of reading, of batched tokenization and of work handed to a worker process."""
_FORMAT_KEYS = {"chat": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}
_LOADERS = {".json": "from_json", ".jsonl": "from_json", ".parquet": "from_parquet", ".csv": "from_csv"}


class DataError(ValueError):
    """Training data that cannot be used; the message names the file (and line or record) at fault."""


@dataclass
class RecordChunk:
    """Consecutive records of one source: raw JSONL `lines` (line number, text) or `rows` read by datasets."""

    path: str
    first_index: int
    """Index of the chunk's first record in its source."""
    lines: list[tuple[int, str]] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.lines) or len(self.rows)

    def records(self, format: str) -> list[dict]:
        """The chunk's records, each checked against `format` (ValueError naming the file and line or record)."""
        records = [_parse_line(self.path, number, text) for number, text in self.lines] if self.lines else self.rows
        for offset, record in enumerate(records):
            _validate_record(record, format, f"{self.path}: record {self.first_index + offset}")
        return records


def record_chunks(path: str, chunk_records: Optional[int] = None) -> Iterator[RecordChunk]:
    """The records of one source in chunks (of CHUNK_RECORDS by default). FileNotFoundError for a missing path,
    ValueError (naming the file) for an unsupported one; a malformed line or record is reported by
    `RecordChunk.records`."""
    chunk_records = chunk_records or CHUNK_RECORDS
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    if source.is_file() and source.suffix.lower() == ".jsonl":
        yield from _jsonl_chunks(source, chunk_records)
        return
    dataset = _load_dataset(source)
    for start in range(0, len(dataset), chunk_records):
        batch = dataset[start:start + chunk_records]
        yield RecordChunk(str(source), start, rows=[dict(zip(batch, values)) for values in zip(*batch.values())])


def first_record(path: str) -> Optional[dict]:
    """The first record of a source (None when it has none), for detecting its format."""
    chunk = next(record_chunks(path, chunk_records=1), None)
    if chunk is None:
        return None
    return _parse_line(chunk.path, *chunk.lines[0]) if chunk.lines else chunk.rows[0]


def resolve_format(path: str, format: str) -> str:
    """`format`, or with "auto" the format detected from the source's first record; ValueError for an empty source."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected 'auto' or one of {FORMATS}")
    record = first_record(path)
    if record is None:
        raise ValueError(f"{path}: the data set is empty")
    return detect_format(record, path) if format == "auto" else format


def load_records(path: str, format: str = "auto") -> tuple[list[dict], str]:
    """Every record of one source as plain dicts (for small data: evaluation, tests), and the resolved format.

    Raises FileNotFoundError for a missing path and ValueError, naming the file (and line or record index),
    for anything unusable.
    """
    resolved = resolve_format(path, format)
    return [record for chunk in record_chunks(path) for record in chunk.records(resolved)], resolved


def tokenize_as_configured(records: Sequence[dict], fmt: str, tokenizer, data) -> tuple[list[dict], dict]:
    """`tokenize_records` with a DataConfig's max_length, overlong policy and eos labelling (train_on_eos)."""
    return tokenize_records(records, fmt, tokenizer, data.max_length, data.overlong, label_eos=data.train_on_eos)


def detect_format(record: dict, path: str) -> str:
    for name in FORMATS:
        if all(key in record for key in _FORMAT_KEYS[name]):
            return name
    raise ValueError(f"{path}: cannot detect the data format from the keys {sorted(record)}; expected 'messages' "
                     f"(chat), 'prompt' and 'completion' (prompt_completion), or 'text' (text)")


def _jsonl_chunks(source: Path, chunk_records: int) -> Iterator[RecordChunk]:
    with open(source, encoding="utf-8") as handle:
        numbered = ((number, line) for number, line in enumerate(handle, start=1) if line.strip())
        index = 0
        while lines := list(itertools.islice(numbered, chunk_records)):
            yield RecordChunk(str(source), index, lines=lines)
            index += len(lines)


def _parse_line(path: str, number: int, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{number}: line {number} is not valid JSON ({error.msg})") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path}:{number}: line {number} is a JSON {type(value).__name__}, not an object")
    return value


def _load_dataset(source: Path):
    """A datasets.Dataset of a non-JSONL source (an empty one when the file has no rows)."""
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
        return loaded
    loader = _LOADERS.get(source.suffix.lower())
    if loader is None:
        raise ValueError(f"{source}: unsupported file type {source.suffix!r}; expected one of {sorted(_LOADERS)} "
                         f"or a datasets.save_to_disk directory")
    try:
        with _quiet_datasets():
            return getattr(datasets.Dataset, loader)(str(source), keep_in_memory=True)
    except Exception as error:  # pyarrow/datasets raise many types; the file name is what the user needs
        if "corresponds to no data" in str(error):  # how datasets reports a file without rows
            return datasets.Dataset.from_dict({})
        raise ValueError(f"{source}: could not be loaded by datasets: {error}") from error


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

