"""Reading a W&B run's transaction log (`run-<id>.wandb`), where an offline run keeps its config, history and summary.

The file is a 7-byte W&B header followed by LevelDB log blocks of 32 KiB; each record has a 7-byte header
(CRC32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last fragment) and carries one of
W&B's own protobuf `Record` messages (wandb.proto.wandb_internal_pb2), parsed here with W&B's classes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

BLOCK, HEADER = 32768, 7


def wandb_records(path: Path) -> list:
    """The `Record` messages of a .wandb file, in order."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    payloads, pending, offset = [], b"", HEADER
    while offset + HEADER <= len(data):
        left = BLOCK - offset % BLOCK
        if left < HEADER:  # the block's zero-filled tail
            offset += left
            continue
        length, kind = int.from_bytes(data[offset + 4:offset + 6], "little"), data[offset + 6]
        payload = data[offset + HEADER:offset + HEADER + length]
        offset += HEADER + length
        if kind == 1:
            payloads.append(payload)
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + payload
        elif kind == 4:
            payloads.append(pending + payload)
        else:
            break
    records = []
    for payload in payloads:
        record = Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _items(items) -> dict:
    return {"/".join(item.nested_key) if item.nested_key else item.key: json.loads(item.value_json) for item in items}


def finished_records(path: Path, timeout_s: float = 30.0) -> list:
    """The records of a finished run's .wandb file, once its `exit` record is there: `run.finish()` can return before
    W&B's service process has written the file's last block."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = wandb_records(path)
        if any(record.WhichOneof("record_type") == "exit" for record in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def wandb_run(path: Path) -> dict:
    """{"config": {key: value}, "history": [{"_step": step, key: value}], "summary": {key: value}} of a finished run's
    .wandb file."""
    run = {"config": {}, "history": [], "summary": {}}
    for record in finished_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":  # the config given to wandb.init
            run["config"].update(_items(record.run.config.update))
        elif kind == "config":
            run["config"].update(_items(record.config.update))
        elif kind == "history":
            run["history"].append({"_step": record.history.step.num, **_items(record.history.item)})
        elif kind == "summary":
            run["summary"].update(_items(record.summary.update))
    return run
