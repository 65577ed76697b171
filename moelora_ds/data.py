"""Training data: load records from disk, and deal them out as deterministic, resumable, per-rank batches.

Three record formats are understood:
- "chat": `{"messages": [{"role": ..., "content": ...}, ...]}` with at least one assistant turn;
- "prompt_completion": `{"prompt": str, "completion": str}`;
- "text": `{"text": str}`.
Tokenization (`tokenize_records`) lives in tokenization.py, padding and packing in collate.py.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .collate import Example, pack_examples, pad_batch
from .tokenization import tokenize_records

__all__ = ["FORMATS", "DataError", "ShardedBatches", "load_records", "tokenize_records", "tokenize_as_configured"]

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


class ShardedBatches:
    """Endless, deterministic micro-batches for one rank of a data-parallel run.

    Each epoch the training units (examples, or packed rows when `packing=True`) are permuted with a
    generator seeded by (seed, epoch), the same on every rank, and cut into global batches of
    `micro_batch_size * world_size` units; rank r takes positions [r*mbs, (r+1)*mbs) of every global
    batch. So the global batch at step t is the union of the ranks' batches and depends only on the
    global batch size, not on how it is split among ranks. The last global batch of an epoch is
    completed by wrapping around to the start of the epoch's order (those units are seen twice), so
    every rank gets `batches_per_epoch` batches. Packing is done once, at construction, over a seeded
    permutation; the packed rows are then shuffled per epoch like examples (see collate.pack_examples
    for the attention caveat).

    `state_dict()` is the position of the next batch; `load_state_dict` continues exactly there
    (positions are counted in global batches, so resume with the same micro_batch_size * world_size).
    """

    def __init__(self, examples: Sequence[Example], *, micro_batch_size: int, rank: int, world_size: int,
                 seed: int, shuffle: bool = True, packing: bool = False, max_length: int,
                 pad_token_id: int) -> None:
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need micro_batch_size >= 1 and 0 <= rank < world_size, got "
                             f"micro_batch_size={micro_batch_size}, rank={rank}, world_size={world_size}")
        if not examples:
            raise ValueError("ShardedBatches got no examples (were they all dropped as longer than max_length?)")
        longest = max(len(e["input_ids"]) for e in examples)
        if longest > max_length:
            raise ValueError(f"an example has {longest} tokens, more than max_length={max_length}")
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.seed, self.shuffle, self.packing, self.pad_token_id = seed, shuffle, packing, pad_token_id
        if packing:
            order = self._permutation(len(examples), epoch=-1) if shuffle else range(len(examples))
            self.units: list[Example] = pack_examples([examples[i] for i in order], max_length)
        else:
            self.units = list(examples)
        self._epoch, self._batch_index = 0, 0
        self._order_cache: tuple[int, Optional[np.ndarray]] = (-1, None)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.units) / (self.micro_batch_size * self.world_size))

    def _permutation(self, n: int, epoch: int) -> np.ndarray:
        # epoch -1 is the packing order; it is offset so no training epoch reuses it.
        return np.random.default_rng([self.seed, epoch + 1]).permutation(n)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Indices into `units` for the whole epoch, wrapped to a multiple of the global batch size."""
        cached_epoch, order = self._order_cache
        if cached_epoch != epoch or order is None:
            n = len(self.units)
            order = self._permutation(n, epoch) if self.shuffle else np.arange(n)
            order = np.resize(order, self.batches_per_epoch * self.micro_batch_size * self.world_size)
            self._order_cache = (epoch, order)
        return order

    def batch_indices(self, epoch: int, index: int) -> list[int]:
        """This rank's unit indices in batch `index` of `epoch`."""
        start = (index * self.world_size + self.rank) * self.micro_batch_size
        return self.epoch_order(epoch)[start:start + self.micro_batch_size].tolist()

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """This rank's batch `index` of `epoch`, without moving the iterator."""
        return pad_batch([self.units[i] for i in self.batch_indices(epoch, index)], self.pad_token_id)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            batch = self.batch(self._epoch, self._batch_index)
            self._batch_index += 1
            if self._batch_index == self.batches_per_epoch:
                self._epoch, self._batch_index = self._epoch + 1, 0
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batch_index": self._batch_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, index = int(state["epoch"]), int(state["batch_index"])
        if epoch < 0 or not 0 <= index < self.batches_per_epoch:
            raise ValueError(f"data position {state} is outside epoch >= 0, 0 <= batch_index < "
                             f"{self.batches_per_epoch}; was the data set or the global batch size changed?")
        self._epoch, self._batch_index = epoch, index
