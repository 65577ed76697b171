"""Resuming a 2-rank ZeRO-3 checkpoint with 1 rank (a universal conversion): the run goes on as if never moved."""

from __future__ import annotations

import json

import pytest

from moelora_ds.checkpoints.reshard import convert_data_position
from moelora_ds.telemetry.metrics import read_metrics

from harness import launch, run_config

pytestmark = pytest.mark.distributed


def test_data_position_converts_between_world_sizes():
    assert convert_data_position({"epoch": 2, "batch_index": 3}, saved_units=4, units=2) == {"epoch": 2,
                                                                                             "batch_index": 6}
    with pytest.raises(ValueError, match="not a whole number"):
        convert_data_position({"epoch": 0, "batch_index": 3}, saved_units=2, units=4)


def test_two_ranks_resume_on_one(tiny_model_dir, tiny_mc_data, tmp_path, subprocess_env):
    """2 ranks x micro-batch 2 to step 3, then 1 rank x micro-batch 2 x grad_accum 2: the same global batches."""
    two = tmp_path / "two"
    config = run_config(tiny_model_dir, tiny_mc_data, two, train={"max_steps": 6, "grad_accum": 1, "save_every": 3,
                                                                  "keep_checkpoints": 0, "output_dir": str(two)})
    (tmp_path / "a").mkdir()
    launch(config, tmp_path / "a", subprocess_env)
    uninterrupted = {r["step"]: r for r in read_metrics(two) if "loss" in r}

    one = tmp_path / "one"
    resumed = {**config, "train": {**config["train"], "output_dir": str(one),
                                   "resume": str(two / "checkpoints" / "step_3")}}
    (tmp_path / "b").mkdir()
    refused = launch(resumed, tmp_path / "b", subprocess_env, world_size=1, check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "configuration error:" in refused.stderr and "train.grad_accum: resuming" in refused.stderr
    assert "needs the same global batch, but micro_batch_size x grad_accum x ranks = 2" in refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr

    resumed["train"]["grad_accum"] = 2
    result = launch(resumed, tmp_path / "b", subprocess_env, world_size=1)
    assert "was written by 2 ranks: converting it to a universal checkpoint for 1" in result.stdout
    logged = {r["step"]: r for r in read_metrics(one) if "loss" in r}
    assert sorted(logged) == [4, 5, 6]
    # Adapters, Adam moments, schedule and data position all carried over: the same losses as without the move.
    for step in (4, 5, 6):
        assert logged[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=1e-5), step
        assert logged[step]["lr"] == pytest.approx(uninterrupted[step]["lr"], rel=1e-12), step
    run_info = json.loads((one / "checkpoints" / "step_6" / "moelora_run.json").read_text())
    assert run_info["world_size"] == 1 and run_info["step"] == 6
    assert sorted(p.name for p in (one / "checkpoints").iterdir() if p.is_dir()) == ["step_6"]
