"""Resuming a 2-rank ZeRO-3 checkpoint with 1 rank: refused by default, exact adapters and data with train.resume_reshard."""

from __future__ import annotations

import json

import pytest
from test_engine import launch, run_config

from moelora_ds.metrics import read_metrics
from moelora_ds.reshard import convert_data_position

pytestmark = pytest.mark.distributed


def test_data_position_converts_between_world_sizes():
    assert convert_data_position({"epoch": 2, "batch_index": 3}, saved_units=4, units=2) == {"epoch": 2,
                                                                                             "batch_index": 6}
    with pytest.raises(ValueError, match="not a whole number"):
        convert_data_position({"epoch": 0, "batch_index": 3}, saved_units=2, units=4)


def test_two_ranks_resume_on_one(tiny_model_dir, tiny_mc_data, tmp_path, subprocess_env):
    two = tmp_path / "two"
    config = run_config(tiny_model_dir, tiny_mc_data, two, train={"max_steps": 5, "grad_accum": 1, "save_every": 3,
                                                                  "keep_checkpoints": 0, "output_dir": str(two)})
    (tmp_path / "a").mkdir()
    launch(config, tmp_path / "a", subprocess_env)
    uninterrupted = {r["step"]: r for r in read_metrics(two) if "loss" in r}

    one = tmp_path / "one"
    resumed = {**config, "train": {**config["train"], "grad_accum": 2, "output_dir": str(one),
                                   "resume": str(two / "checkpoints" / "step_3")}}
    (tmp_path / "b").mkdir()
    refused = launch(resumed, tmp_path / "b", subprocess_env, world_size=1, check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "configuration error:" in refused.stderr and "train.resume_reshard: " in refused.stderr
    assert "written by 2 ranks under ZeRO stage 3 and is resumed with 1" in refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr

    resumed["train"]["resume_reshard"] = True
    result = launch(resumed, tmp_path / "b", subprocess_env, world_size=1)
    assert "optimizer state (Adam moments) RESET to zero" in result.stdout
    logged = {r["step"]: r for r in read_metrics(one) if "loss" in r}
    assert sorted(logged) == [4, 5]
    # Step 4 runs on the adapters of step 3, on the same global batch, at the same point of the schedule.
    assert logged[4]["loss"] == pytest.approx(uninterrupted[4]["loss"], rel=1e-5)
    assert logged[4]["lr"] == pytest.approx(uninterrupted[4]["lr"], rel=1e-12)
    run_info = json.loads((one / "checkpoints" / "step_5" / "moelora_run.json").read_text())
    assert run_info["world_size"] == 1 and run_info["step"] == 5
