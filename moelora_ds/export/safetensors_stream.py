"""Streaming safetensors I/O: read a model directory tensor by tensor, write size-limited shards as they fill.

Neither side holds a whole model: reading yields one tensor at a time from the directory's files; the
writer keeps at most one shard's tensors before writing it, so peak memory is about the largest shard.
Output follows Hugging Face's layout: one `model.safetensors`, or `model-0000i-of-0000n.safetensors`
shards with `model.safetensors.index.json`.

Reading uses plain file reads into fresh tensors rather than `safetensors.safe_open`: its tensors are
views of a memory-mapped file, and every page touched stays resident while the mapping lives (measured
on SmolLM2-135M: the whole 513 MiB file ended up in RSS whatever the shard size).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import BinaryIO, Iterator

import torch
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from `2GB`, `500MB`, `64MiB`, `1000000` (decimal units as Hugging Face uses them, binary with `i`)."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"not a size: {text!r} (expected e.g. 2GB, 500MB, 64MiB or a byte count)")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if size < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return size


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a Hugging Face directory, in the index's order (or the single file)."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in dict.fromkeys(weight_map.values())]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise FileNotFoundError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights are supported)")


def _read_header(handle: BinaryIO, path: Path) -> tuple[dict, int]:
    """The tensor entries of a safetensors file (without `__metadata__`) and where its data starts."""
    try:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a safetensors file ({error})") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the directory's safetensors files, read one at a time in file order."""
    for path in safetensors_files(model_dir):
        with open(path, "rb") as handle:
            header, data_start = _read_header(handle, path)
            for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                if entry["dtype"] not in _DTYPES:
                    raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
                tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
                begin, end = entry["data_offsets"]
                handle.seek(data_start + begin)
                if end - begin != tensor_bytes(tensor) or \
                        handle.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())) != end - begin:
                    raise ValueError(f"{path}: tensor {name!r} is truncated or inconsistent with its header")
                yield name, tensor


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ShardedSafetensorsWriter:
    """Collects tensors into shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own)."""

    def __init__(self, out_dir: Path, max_shard_bytes: int) -> None:
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        size = tensor_bytes(tensor)
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, give the shards their final names (and the index if several); return them."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            final = [self.out_dir / SINGLE_FILE]
        else:
            final = [self.out_dir / f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        for (path, _), target in zip(self._shards, final):
            path.replace(target)
        if count > 1:
            weight_map = {name: target.name for (_, names), target in zip(self._shards, final) for name in names}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return final
