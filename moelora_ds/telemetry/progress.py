"""Progress bars for the slow steps (evaluation, scoring, tokenization, export), drawn by rank 0 only."""

from __future__ import annotations

from typing import Iterable, Optional, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def is_rank0() -> bool:
    """Rank 0 of the process group, or a process without one."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def progress(iterable: Optional[Iterable[T]] = None, *, desc: str, total: Optional[int] = None, unit: str = "it",
             unit_scale: bool = False) -> tqdm:
    """`iterable` with a bar on rank 0 (also into logs), or (no iterable) a bar to `update` by hand."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, unit_scale=unit_scale, dynamic_ncols=True,
                leave=False, disable=not is_rank0(), mininterval=1.0)
