"""Prepared data across the ranks of a launched run: built once, reused by the next run, bad input reported
by every rank before the model loads."""

from __future__ import annotations

import pytest

from conftest import write_jsonl
from harness import launch, multiple_choice_records, run_config

PREPARING = "[moelora-ds] preparing "


@pytest.mark.distributed
def test_two_ranks_prepare_a_list_of_files_once_and_the_next_run_reuses_it(tiny_model_dir, tmp_path, subprocess_env):
    first = write_jsonl(tmp_path / "a.jsonl", multiple_choice_records(30, seed=0))
    second = write_jsonl(tmp_path / "b.jsonl", multiple_choice_records(20, seed=1))
    config = run_config(tiny_model_dir, {"train": first}, tmp_path / "out", train={"max_steps": 2})
    config["data"].update(train_path=[str(first), str(second)], eval_path=str(second), cache_dir=str(tmp_path / "c"))
    run = launch(config, tmp_path, subprocess_env)
    assert run.stdout.count(PREPARING) == 2, run.stdout[-3000:]  # train and eval data, once each
    assert "50 chat records, 50 examples" in run.stdout and "final evaluation" in run.stdout
    config["train"]["output_dir"] = str(tmp_path / "again")
    again = launch(config, tmp_path, subprocess_env)
    assert PREPARING not in again.stdout and "50 chat records, 50 examples" in again.stdout
    assert len(list((tmp_path / "c").iterdir())) == 2


@pytest.mark.distributed
def test_an_overlong_record_is_reported_by_every_rank_before_the_model_loads(tiny_model_dir, tmp_path,
                                                                            subprocess_env):
    path = write_jsonl(tmp_path / "long.jsonl", multiple_choice_records(5))
    config = run_config(tiny_model_dir, {"train": path}, tmp_path / "out")
    config["data"].update(overlong="error", max_length=8)
    result = launch(config, tmp_path, subprocess_env, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("moelora-train: data error:")]
    assert result.returncode == 2 and len(errors) == 2, result.stderr[-3000:]
    assert all(f"data.train_path: {path}: record 0 is " in line and "more than max_length=8" in line for line in errors)
    assert "Traceback" not in result.stdout + result.stderr
