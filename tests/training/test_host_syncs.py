"""Host reads of device values per training step, through the real Trainer and DeepSpeed engine, in this process.

On an accelerator every read waits for the device (tests/host_syncs.py says what is counted). The
trainer's own code reads twice per step: one all-reduce before the boundary `engine.step()` (losses and
their finiteness, stage-0 gradient finiteness) and one after it (state finiteness, tokens, preemption).
DeepSpeed's and transformers' reads are held at today's numbers so that a new one shows up here.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from moelora_ds.training.loss import host_to_device
from moelora_ds.training.trainer import Trainer

from harness import load_config_from_dict, run_config
from host_syncs import HostReads, reads_per_step

OURS = {"moelora_ds/distributed/process_group.py:all_sum": 2}
OTHERS_AT_MOST = {
    # torch AdamW reads its `step` counters (host tensors on an accelerator too), one per parameter tensor
    0: {"deepspeed": 24, "transformers": 4},
    # the ZeRO-3 optimizer's overflow check and the gradient norm
    3: {"deepspeed": 3, "transformers": 4},
}


@pytest.fixture(scope="module")
def process_group():
    """The Trainer's process group in this process, torn down afterwards with the rendezvous variables it exported
    (later tests launch ranks with a copy of this environment)."""
    environ = dict(os.environ)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.parametrize("stage", [0, 3])
def test_host_reads_per_training_step(stage, process_group, tiny_model_dir, tiny_mc_data, tmp_path):
    config = run_config(tiny_model_dir, tiny_mc_data, tmp_path / "out", deepspeed=f"ds_configs/zero{stage}.json",
                        train={"max_steps": 4, "save_every": 0, "log_every": 100, "grad_clip": 1.0,
                               "output_dir": str(tmp_path / "out")})
    steps, _, copies = reads_per_step(Trainer(load_config_from_dict(config)))
    assert len(steps) == 4 and not any(copies)  # nothing leaves the host on the CPU
    for step in steps[1:3]:  # the first step sets things up; the last one's tail is the end of training
        ours = {where: n for where, n in step.items() if where.startswith("moelora_ds")}
        assert ours == OURS, dict(step)
        for library, limit in OTHERS_AT_MOST[stage].items():
            assert sum(n for where, n in step.items() if where.startswith(library)) <= limit, dict(step)


def test_blocking_host_to_device_copies_are_counted():
    """Copies of unpinned host tensors to another device (here the meta device, the CPU's stand-in for an
    accelerator) are counted apart from host reads; host_to_device leaves a tensor bound for the CPU alone."""
    source = torch.arange(6)
    with HostReads() as reads:
        source.to("meta")
        torch.empty(6, dtype=source.dtype, device="meta").copy_(source)
        source.to(torch.float64)
        same = host_to_device(source, torch.device("cpu"))
    assert sum(reads.blocking_copies.values()) == 2 and reads.total() == 0
    assert same is source
