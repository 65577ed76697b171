"""Checkpoint files are read with the weights-only unpickler: allowed contents load, a pickled callable is refused."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from moelora_ds.checkpoints.locate import CheckpointError
from moelora_ds.checkpoints.safe_load import safe_load, vet_checkpoint_files
from moelora_ds.checkpoints.save_load import rng_state


class _RunsACommand:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_rng_state_round_trips_through_the_safe_loader(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.save(rng_state(), tmp_path / "rng_state_rank0.pt")
    loaded = safe_load(tmp_path / "rng_state_rank0.pt")
    assert loaded["python"] == random.getstate()
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(loaded["numpy"], np.random.get_state()))
    torch.testing.assert_close(loaded["torch"], torch.get_rng_state(), rtol=0, atol=0)


def test_a_pickled_callable_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-was-run"
    torch.save({"module": {"w": torch.zeros(2)}, "payload": _RunsACommand(marker)}, tmp_path / "bad_model_states.pt")
    with pytest.raises(CheckpointError, match=r"bad_model_states\.pt: refused: .*GLOBAL posix\.system"):
        vet_checkpoint_files(tmp_path)
    assert not marker.exists()
