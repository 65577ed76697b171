"""Preparing data: records on disk -> tokenized examples in the prepared-data cache (prepared.py), built once.

A `Preparation` names the sources and every setting that changes the examples; its `cache_key` hashes them
with each source's path, size and modification time and with the tokenizer (vocabulary, normalisation,
special tokens, chat template), so a changed input or tokenizer gets a directory of its own. `prepare`
opens the directory of that key, or builds it: the sources are read in chunks of records
(records.record_chunks) and tokenized in batches by worker processes, a bounded number of chunks in flight,
the results appended in order to the cache being written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from moelora_ds.data.prepared import FORMAT_VERSION, CorruptCache, PreparedExamples, PreparedWriter, open_prepared
from moelora_ds.data.records import RecordChunk, record_chunks, resolve_format
from moelora_ds.data.tokenization import TOKEN_DTYPE, tokenize_batch
from moelora_ds.telemetry.progress import progress

MAX_DEFAULT_WORKERS = 8


@dataclass(frozen=True)
class Preparation:
    """What one prepared data set is made of."""

    sources: tuple[str, ...]
    """Data files or `datasets.save_to_disk` directories, concatenated in this order."""
    format: str
    """"auto" or a record format (records.FORMATS); auto is resolved from the first source's first record."""
    max_length: int
    overlong: str
    label_eos: bool
    limit: Optional[int] = None
    """Only the first `limit` records (data.eval_max_samples for evaluation data); None: all."""

    @classmethod
    def of(cls, paths, data, limit: Optional[int] = None) -> Preparation:
        """The preparation of `paths` (one path or a list) with a DataConfig's tokenization settings."""
        sources = (paths,) if isinstance(paths, str) else tuple(paths)
        return cls(sources, data.format, data.max_length, data.overlong, data.train_on_eos, limit)


def default_workers() -> int:
    return max(1, min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1))


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what makes a tokenizer tokenize the way it does: vocabulary, merges, normalisation and
    post-processing (the fast tokenizer's JSON, else the vocabulary), special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    facts = [type(tokenizer).__name__, vocabulary, str(tokenizer.chat_template),
             json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str), str(tokenizer.eos_token_id)]
    return hashlib.sha256("\0".join(facts).encode()).hexdigest()


def source_fingerprint(path: str) -> list:
    """(absolute path, size, mtime) of a source file, or of every file inside a source directory."""
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def cache_key(preparation: Preparation, tokenizer) -> str:
    described = {"version": FORMAT_VERSION, **asdict(preparation),
                 "files": [source_fingerprint(s) for s in preparation.sources],
                 "tokenizer": tokenizer_fingerprint(tokenizer)}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]


def cache_directory(preparation: Preparation, tokenizer, cache_dir: str) -> tuple[Path, str]:
    """Where `preparation` is cached under `cache_dir`, and its key (the directory is named after the first
    source and the key)."""
    key = cache_key(preparation, tokenizer)
    return Path(cache_dir) / f"{Path(preparation.sources[0]).stem}-{key}", key


def prepare(preparation: Preparation, tokenizer, cache_dir: str, workers: Optional[int] = None,
            log: Callable[[str], None] = print) -> tuple[PreparedExamples, bool]:
    """The prepared examples, opened from the cache or built now (then True). A cached directory that does not
    check out is rebuilt, saying why. Bad input raises FileNotFoundError or ValueError naming the file and line
    or record."""
    directory, key = cache_directory(preparation, tokenizer, cache_dir)
    if directory.exists():
        try:
            return open_prepared(directory, key), False
        except CorruptCache as error:
            log(f"[moelora-ds] the prepared data is not usable ({error}); rebuilding it")
    workers = workers or default_workers()
    log(f"[moelora-ds] preparing {', '.join(preparation.sources)} once into {directory} ({workers} worker "
        f"process{'es' if workers > 1 else ''})")
    started = time.perf_counter()
    examples = build(preparation, tokenizer, directory, key, workers)
    log(f"[moelora-ds] prepared {examples.stats['records']} records into {examples.stats['examples']} examples of "
        f"{examples.stats['tokens']} tokens in {time.perf_counter() - started:.1f} s")
    return examples, True


def build(preparation: Preparation, tokenizer, directory: Path, key: str, workers: int) -> PreparedExamples:
    """Tokenize every record of `preparation` into a new prepared `directory` (see PreparedWriter)."""
    fmt = resolve_format(preparation.sources[0], preparation.format)
    for source in preparation.sources[1:]:
        resolve_format(source, fmt)  # each source exists, is readable and not empty
    writer = PreparedWriter(directory)
    records = truncated = dropped = 0
    try:
        chunks = _limited(itertools.chain.from_iterable(map(record_chunks, preparation.sources)), preparation.limit)
        with progress(desc="prepare", unit="record", unit_scale=True) as bar:
            for result in _tokenized(chunks, (tokenizer, fmt, preparation), workers):
                tokens, labelled, lengths, count, chunk_truncated, chunk_dropped = result
                writer.append(tokens, labelled, lengths)
                records, truncated, dropped = records + count, truncated + chunk_truncated, dropped + chunk_dropped
                bar.update(count)
        facts = {"format": fmt, "sources": list(preparation.sources), "records": records, "truncated": truncated,
                 "dropped": dropped, "max_length": preparation.max_length, "overlong": preparation.overlong,
                 "label_eos": preparation.label_eos, "limit": preparation.limit}
        return writer.commit(key, facts)
    except BaseException:
        writer.abort()
        raise


def _limited(chunks: Iterable[RecordChunk], limit: Optional[int]) -> Iterator[RecordChunk]:
    taken = 0
    for chunk in chunks:
        if limit is not None and taken + len(chunk) >= limit:
            chunk.lines, chunk.rows = chunk.lines[:limit - taken], chunk.rows[:limit - taken]
            if len(chunk):
                yield chunk
            return
        taken += len(chunk)
        yield chunk


def _tokenized(chunks: Iterator[RecordChunk], setup: tuple, workers: int) -> Iterator[tuple]:
    """`_tokenize_chunk` of every chunk, in order: in this process, or in `workers` processes with at most
    two chunks per worker in flight (so reading never runs far ahead of tokenizing)."""
    if workers == 1:
        _start_worker(*setup, quiet=False)
        yield from map(_tokenize_chunk, chunks)
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=setup) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_tokenize_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


_worker: dict = {}
"""What `_tokenize_chunk` tokenizes with, set by `_start_worker` in each worker process."""


def _start_worker(tokenizer, fmt: str, preparation: Preparation, quiet: bool = True) -> None:
    if quiet:  # the workers already use every core
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tokenizer=tokenizer, fmt=fmt, preparation=preparation)


def _tokenize_chunk(chunk: RecordChunk) -> tuple:
    """A chunk's examples as (tokens, labelled, lengths) arrays and its (records, truncated, dropped) counts."""
    tokenizer, fmt, preparation = _worker["tokenizer"], _worker["fmt"], _worker["preparation"]
    records = chunk.records(fmt)
    try:
        examples, truncated, dropped = tokenize_batch(records, fmt, tokenizer, preparation.max_length,
                                                      preparation.overlong, preparation.label_eos, chunk.first_index)
    except ValueError as error:
        raise ValueError(f"{chunk.path}: {error}") from None
    tokens = np.concatenate([ids for ids, _ in examples]) if examples else np.zeros(0, TOKEN_DTYPE)
    labelled = np.concatenate([flags for _, flags in examples]) if examples else np.zeros(0, bool)
    lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int32)
    return tokens, labelled, lengths, len(records), truncated, dropped
