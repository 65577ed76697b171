"""Prepared data shared by the ranks of a run: one process builds it, every rank memory-maps it.

The builder is rank 0, or each node's local rank 0 when `data.cache_dir` is node-local
(`data.cache_node_local`). The other ranks wait for it in a collective, which `train.collective_timeout_s`
bounds; a builder that finds bad input sends its message to every rank, so each reports the same
file and line (or record) before any rank loads the model.
"""

from __future__ import annotations

from moelora_ds.data.prepare import Preparation, cache_directory, prepare
from moelora_ds.data.prepared import CorruptCache, PreparedExamples, open_prepared
from moelora_ds.data.records import DataError


def prepare_for_ranks(preparation: Preparation, tokenizer, data, what: str) -> PreparedExamples:
    """The prepared examples of `preparation` on every rank (built once, by the builder). `data` is the run's
    DataConfig (cache_dir, cache_node_local, prepare_workers); `what` names the config key in messages.
    Bad input is a DataError on every rank."""
    import torch.distributed as dist

    from moelora_ds.distributed.process_group import local_rank

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    builder = not distributed or (local_rank() == 0 if data.cache_node_local else dist.get_rank() == 0)
    failure, examples = "", None
    if builder:
        try:
            examples, _ = prepare(preparation, tokenizer, data.cache_dir, data.prepare_workers,
                                  log=lambda message: print(message, flush=True))
        except (OSError, ValueError) as error:
            failure = f"{what}: {error}"
    if distributed:
        failures = [""] * dist.get_world_size()
        dist.all_gather_object(failures, failure)  # the others wait here for the builders
        failure = next((message for message in failures if message), "")
    if failure:
        raise DataError(failure)
    if examples is None:
        directory, key = cache_directory(preparation, tokenizer, data.cache_dir)
        try:
            examples = open_prepared(directory, key)
        except CorruptCache as error:
            raise DataError(f"{what}: the prepared data the builder wrote is not readable here ({error}); when "
                            f"data.cache_dir is not shared between the nodes, set data.cache_node_local: true") from None
    return examples
