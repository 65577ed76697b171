"""Deterministic, resumable, per-rank micro-batches of a data-parallel run."""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from moelora_ds.data.collate import Example, pack_examples, pad_batch


class ShardedBatches:
    """Endless, deterministic micro-batches for one rank of a data-parallel run.

    Each epoch the training units (examples, or packed rows when `packing=True`) are permuted with a
    generator seeded by (seed, epoch), the same on every rank, and cut into global batches of
    `micro_batch_size * world_size` units; rank r takes positions [r*mbs, (r+1)*mbs) of every global
    batch. So the global batch at step t is the union of the ranks' batches and depends only on the
    global batch size, not on how it is split among ranks. The last global batch of an epoch is
    completed by wrapping around to the start of the epoch's order (those units are seen twice), so
    every rank gets `batches_per_epoch` batches. Packing is done once, at construction, over a seeded
    permutation; the packed rows are then shuffled per epoch like examples (collate.pack_examples says
    how their examples are kept from attending to each other).

    Everything works on example indices and the examples' lengths: `examples` is a list of examples or the
    memory-mapped prepared examples (prepared.PreparedExamples, whose `lengths` array is used), and an example
    is read only when a batch that holds it is drawn, so this object's memory is a few integers per example.

    `state_dict()` is the position of the next batch; `load_state_dict` continues exactly there
    (positions are counted in global batches, so resume with the same micro_batch_size * world_size).
    """

    def __init__(self, examples: Sequence[Example], *, micro_batch_size: int, rank: int, world_size: int,
                 seed: int, shuffle: bool = True, packing: bool = False, max_length: int,
                 pad_token_id: int) -> None:
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need micro_batch_size >= 1 and 0 <= rank < world_size, got "
                             f"micro_batch_size={micro_batch_size}, rank={rank}, world_size={world_size}")
        if not len(examples):
            raise ValueError("ShardedBatches got no examples (were they all dropped as longer than max_length?)")
        lengths = getattr(examples, "lengths", None)
        lengths = np.asarray([len(e["input_ids"]) for e in examples] if lengths is None else lengths)
        if lengths.max() > max_length:
            raise ValueError(f"an example has {lengths.max()} tokens, more than max_length={max_length}")
        self.examples, self.micro_batch_size, self.rank, self.world_size = examples, micro_batch_size, rank, world_size
        self.seed, self.shuffle, self.packing, self.pad_token_id = seed, shuffle, packing, pad_token_id
        self.max_length = max_length
        self.units = _Units(self, lengths)
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


class _Units(Sequence):
    """The training units as a lazy sequence: the examples, or (packing) rows of consecutive examples of the
    packing order, their boundaries found from the lengths by the next-fit rule of collate.pack_examples."""

    def __init__(self, batches: ShardedBatches, lengths: np.ndarray) -> None:
        self.examples, self.max_length = batches.examples, batches.max_length
        self.order: Optional[np.ndarray] = None
        self.row_starts: Optional[np.ndarray] = None
        if batches.packing:
            n = len(lengths)
            self.order = batches._permutation(n, epoch=-1) if batches.shuffle else np.arange(n)
            self.row_starts = _next_fit_rows(lengths[self.order], batches.max_length)

    def __len__(self) -> int:
        return len(self.examples) if self.row_starts is None else len(self.row_starts) - 1

    def __getitem__(self, index: int) -> Example:
        if self.row_starts is None:
            return self.examples[int(index)]
        members = self.order[self.row_starts[index]:self.row_starts[index + 1]]
        (row,) = pack_examples([self.examples[int(i)] for i in members], self.max_length)
        return row


def _next_fit_rows(lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Start positions (and the end) of the rows that next-fit packing of `lengths`, in order, makes."""
    starts, used = [0], 0
    for position, length in enumerate(lengths.tolist()):
        if length == 0:
            raise ValueError(f"example at packing position {position} has 0 tokens; packing needs 1..max_length")
        if used + length > max_length:
            starts.append(position)
            used = 0
        used += length
    starts.append(len(lengths))
    return np.asarray(starts, dtype=np.int64)
