"""The prepared-data cache's format: tokenized examples as flat numpy arrays, memory-mapped by every rank.

A prepared data set is one directory of raw little-endian arrays and a manifest:
- tokens.bin    int32[T]: every example's token ids, one example after another;
- labelled.bin  uint8[T]: 1 where the token is trained on. A trained token's label is the token itself (the
                model shifts labels), every other label is -100, so one byte per token holds the labels;
- lengths.bin   int32[N]: tokens per example;
- offsets.bin   int64[N+1]: where each example starts in tokens.bin (offsets[N] == T);
- manifest.json: the counts, the sha256 of offsets.bin, the cache key and what was prepared; written last.

Why numpy memory maps rather than a datasets Arrow table: the batcher needs the lengths and, per example,
two slices; a memory-mapped slice costs about a microsecond and no Python object exists for an example
until it is drawn, while Arrow rows come back through pyarrow/datasets as Python lists at tens of
microseconds each. The ranks of a node map the same files, so the operating system's page cache holds
the tokens once per node, and a rank's own memory does not grow with the data.

A directory is written under a temporary name and renamed into place only when complete (`PreparedWriter`),
and read only when its manifest, file sizes and offsets checksum agree (`open_prepared`), so a killed or
concurrent build never leaves a directory that a later run trusts.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Sequence

import numpy as np

from moelora_ds.data.collate import IGNORE_INDEX
from moelora_ds.data.tokenization import TOKEN_DTYPE

FORMAT_VERSION = 1
"""Bumped whenever the files or the tokenization change meaning, so older caches are rebuilt."""
MANIFEST = "manifest.json"
_ARRAYS = {"tokens": TOKEN_DTYPE, "labelled": np.uint8, "lengths": np.int32, "offsets": np.int64}


class CorruptCache(ValueError):
    """A prepared directory that is incomplete or inconsistent; the message says what is wrong."""


class PreparedExamples(Sequence):
    """The examples of one prepared directory: `examples[i]` is {"input_ids", "labels"} (lists of ints),
    read from the memory maps when asked for; `lengths` is the memory-mapped int32 array of their lengths."""

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.directory, self.manifest = directory, manifest
        counts = {"tokens": manifest["tokens"], "labelled": manifest["tokens"], "lengths": manifest["examples"],
                  "offsets": manifest["examples"] + 1}
        self._arrays = {name: np.memmap(directory / f"{name}.bin", dtype=dtype, mode="r", shape=(counts[name],))
                        if counts[name] else np.zeros(0, dtype) for name, dtype in _ARRAYS.items()}
        self.lengths: np.ndarray = self._arrays["lengths"]

    @property
    def stats(self) -> dict:
        """{"records", "examples", "tokens", "truncated", "dropped"} and the resolved "format"."""
        return {key: self.manifest[key] for key in ("format", "records", "examples", "tokens", "truncated", "dropped")}

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index):
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"PreparedExamples takes one integer index, got {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        start, end = self._arrays["offsets"][index % len(self):index % len(self) + 2]
        ids = np.asarray(self._arrays["tokens"][start:end])
        labels = np.where(self._arrays["labelled"][start:end] != 0, ids, IGNORE_INDEX)
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}


def open_prepared(directory: Path, key: str) -> PreparedExamples:
    """The prepared examples in `directory` after checking them; CorruptCache (saying why) when they do not check."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise CorruptCache(f"{directory}: no {MANIFEST} (an unfinished build)") from None
    except (OSError, ValueError) as error:
        raise CorruptCache(f"{directory}/{MANIFEST}: unreadable ({error})") from None
    if manifest.get("version") != FORMAT_VERSION or manifest.get("key") != key:
        raise CorruptCache(f"{directory}: built by another version or for other inputs")
    expected = {"tokens": manifest["tokens"], "labelled": manifest["tokens"], "lengths": manifest["examples"],
                "offsets": manifest["examples"] + 1}
    for name, count in expected.items():
        size = (directory / f"{name}.bin").stat().st_size if (directory / f"{name}.bin").exists() else -1
        if size != count * np.dtype(_ARRAYS[name]).itemsize:
            raise CorruptCache(f"{directory}/{name}.bin: {size} bytes, expected {count} {_ARRAYS[name].__name__}")
    if _sha256(directory / "offsets.bin") != manifest["offsets_sha256"]:
        raise CorruptCache(f"{directory}/offsets.bin: checksum differs from the manifest's")
    return PreparedExamples(directory, manifest)


class PreparedWriter:
    """Writes one prepared directory: `append` examples chunk by chunk, then `commit` (or `abort`).

    Everything goes to `<final>.tmp-<host>-<pid>` first; `commit` computes the offsets, writes the manifest
    last and renames the directory to `final`. When another process committed `final` first, its copy is
    kept if it checks out (ours is discarded) and replaced otherwise.
    """

    def __init__(self, final: Path) -> None:
        self.final = final
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(final)
        self.staging = final.parent / f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        self._files = {name: open(self.staging / f"{name}.bin", "wb") for name in ("tokens", "labelled", "lengths")}
        self.examples = self.tokens = 0

    def append(self, tokens: np.ndarray, labelled: np.ndarray, lengths: np.ndarray) -> None:
        """Examples given as their concatenated tokens, their labelled flags and their lengths."""
        self._files["tokens"].write(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes())
        self._files["labelled"].write(np.ascontiguousarray(labelled, dtype=np.uint8).tobytes())
        self._files["lengths"].write(np.ascontiguousarray(lengths, dtype=np.int32).tobytes())
        self.examples += len(lengths)
        self.tokens += len(tokens)

    def commit(self, key: str, facts: dict) -> PreparedExamples:
        """Finish (offsets, manifest) and publish under the final name; `facts` go into the manifest."""
        for handle in self._files.values():
            handle.close()
        lengths = np.fromfile(self.staging / "lengths.bin", dtype=np.int32)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        offsets.tofile(self.staging / "offsets.bin")
        manifest = {"version": FORMAT_VERSION, "key": key, **facts, "examples": self.examples, "tokens": self.tokens,
                    "offsets_sha256": _sha256(self.staging / "offsets.bin")}
        (self.staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        try:
            os.rename(self.staging, self.final)
        except OSError:  # another process published it first (or left a broken copy there)
            try:
                published = open_prepared(self.final, key)
                shutil.rmtree(self.staging, ignore_errors=True)
                return published
            except CorruptCache:
                discarded = self.final.with_name(f"{self.staging.name}.discarded")
                os.rename(self.final, discarded)
                shutil.rmtree(discarded, ignore_errors=True)
                os.rename(self.staging, self.final)
        return open_prepared(self.final, key)

    def abort(self) -> None:
        for handle in self._files.values():
            handle.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def _remove_stale_staging(final: Path) -> None:
    """Remove this host's leftovers of builds of `final` whose process is gone (a killed build)."""
    prefix = f"{final.name}.tmp-{socket.gethostname()}-"
    for leftover in final.parent.glob(f"{prefix}*"):
        pid = leftover.name[len(prefix):]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except OSError as error:
        return error.errno != errno.ESRCH  # EPERM: it exists, owned by another user
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()
