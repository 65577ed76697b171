"""Counting host reads of tensor values (`.item()`, `bool()`, `float()`, `int()`, `.tolist()`, data-dependent shapes).

On an accelerator each such read waits for the device to finish everything queued before it (a host
synchronisation); on the CPU they cost nothing, so they are counted, not timed. Every torch operator that
returns a value to Python or sizes its output by the data is counted, with the innermost caller from
moelora_ds, deepspeed or transformers, whichever comes first going outwards. Host-side work on CPU batches
is done in numpy by the trainer (numpy cannot read device memory), so every read counted here would be a
device read on an accelerator.

Copies from pageable (unpinned) host memory to a device are counted apart (`blocking_copies`): on CUDA such a
copy first waits for the device's queue to drain, so the host cannot run ahead of the device either.
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNCING_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
               aten._linalg_check_errors.default, aten.equal.default, aten._unique2.default,
               aten.unique_consecutive.default, aten.unique_dim.default}
"""Operators that read tensor values on the host: item/bool/float/int (`_local_scalar_dense`), data-sized outputs
(nonzero, masked_select, unique), torch.linalg's error checks, torch.equal."""
LIBRARIES = ("moelora_ds", "deepspeed", "transformers")


def caller() -> str:
    """`library/file.py:function` of the innermost frame of LIBRARIES on the stack ('other' if none)."""
    for frame in reversed(traceback.extract_stack()):
        parts = Path(frame.filename).parts
        for library in LIBRARIES:
            if library in parts:
                tail = "/".join(parts[parts.index(library):])
                return f"{tail}:{frame.name}"
    return "other"


def is_pageable_host_to_device(func, args, kwargs) -> bool:
    """Whether an operator copies an unpinned CPU tensor to another device (`.to(device)` or `copy_`)."""
    if func is aten._to_copy.default:
        source, target = args[0], kwargs.get("device")
    elif func is aten.copy_.default:
        source, target = args[1], args[0].device
    else:
        return False
    return (target is not None and torch.device(target).type != "cpu" and isinstance(source, torch.Tensor)
            and source.device.type == "cpu" and not source.is_pinned())


class HostReads(TorchDispatchMode):
    """`with HostReads() as reads:` counts host reads of tensor values by caller (`reads.by_caller`)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_caller: Counter[str] = Counter()
        self.blocking_copies: Counter[str] = Counter()
        self._tolist = torch.Tensor.tolist

    def __enter__(self):
        mode = self

        def tolist(tensor):
            mode.by_caller[caller()] += 1
            return mode._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING_OPS or (func is aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])):
            self.by_caller[caller()] += 1
        elif is_pageable_host_to_device(func, args, kwargs or {}):
            self.blocking_copies[caller()] += 1
        return func(*args, **(kwargs or {}))

    def total(self, library: str = "") -> int:
        """How many reads came from callers in `library` (all of them when empty)."""
        return sum(n for where, n in self.by_caller.items() if where.startswith(library))


def reads_per_step(trainer, cuda_syncs: bool = False) -> tuple[list[Counter], list[int], list[Counter]]:
    """Run `trainer.train()` and return per step (its train_step and what the loop does after it) the host reads by
    caller, with `cuda_syncs` the synchronizing calls torch.cuda's sync debug mode saw, and the blocking host-to-device
    copies by caller."""
    reads, marks = HostReads(), []
    train_step = trainer.train_step

    def mark() -> tuple[Counter, int, Counter]:
        return Counter(reads.by_caller), len(caught), Counter(reads.blocking_copies)

    with reads, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def marked(batch_iter):
            marks.append(mark())
            return train_step(batch_iter)

        trainer.train_step = marked
        if cuda_syncs:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train()
        finally:
            if cuda_syncs:
                torch.cuda.set_sync_debug_mode("default")
        marks.append(mark())
    steps = list(zip(marks, marks[1:]))
    synced = [sum("synchroniz" in str(w.message) for w in caught[a[1]:b[1]]) for a, b in steps]
    return [b[0] - a[0] for a, b in steps], synced, [b[2] - a[2] for a, b in steps]
