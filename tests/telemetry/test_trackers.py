"""Experiment trackers with the real packages: an MLflow file store read back with MLflow's client, a W&B offline run
read from its own files, a failing tracker as a warning, a missing one as a configuration error, and a 2-rank run
reporting to both."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from moelora_ds.config import ConfigError, load_config
from moelora_ds.data.batches import ShardedBatches
from moelora_ds.data.collate import IGNORE_INDEX
from moelora_ds.data.records import load_records, tokenize_as_configured
from moelora_ds.models.loading import load_tokenizer
from moelora_ds.telemetry.metrics import read_metrics
from moelora_ds.telemetry.trackers import PACKAGES, TrackedRun, Trackers, installed, requested
from moelora_ds.training.preflight import check_report_to

from harness import launch, load_config_from_dict, reference_run, run_config
from wandb_log import wandb_run

PARAMS = {"train.lr": 0.01, "moelora.target_modules": ["q_proj", "v_proj"], "world_size": 2}
LAYERS = 120
"""Per-layer health scalars of step 3: more than one MLflow request holds (1000)."""


def log_three_steps(trackers: Trackers, tmp_path: Path) -> None:
    for step in (1, 2, 3):
        trackers.log_metrics({"loss": 1.0 / step, "grad_norm": 2.0 * step, "skipped": "why", "epoch": 0}, step)
    trackers.log_metrics({f"health/model.layers.{i}.q_proj/share_{e}": 0.25 for i in range(LAYERS) for e in range(9)},
                         3)
    (tmp_path / "loss_curve.png").write_bytes(b"\x89PNG curve")
    trackers.log_artifacts([tmp_path / "loss_curve.png", tmp_path / "never_written.png"])
    trackers.close()


def test_mlflow_file_store_run_is_read_back_with_mlflows_client(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this opt-in
    warnings: list[str] = []
    log_three_steps(Trackers(["mlflow"], TrackedRun("run-a", tmp_path, PARAMS), warn=warnings.append), tmp_path)
    assert warnings == []
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("moelora-ds").experiment_id])
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.01", "moelora.target_modules": "['q_proj', 'v_proj']",
                               "world_size": "2"}
    history = client.get_metric_history(run.info.run_id, "grad_norm")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 4.0), (3, 6.0)]
    assert len([key for key in run.data.metrics if key.startswith("health/")]) == LAYERS * 9
    assert "skipped" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["loss_curve.png"]


def test_wandb_offline_run_files_hold_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    warnings: list[str] = []
    log_three_steps(Trackers(["wandb"], TrackedRun("run-b", tmp_path, PARAMS), warn=warnings.append), tmp_path)
    assert warnings == []
    (run_dir,) = (tmp_path / "wandb-dir" / "wandb").glob("offline-run-*")
    run = wandb_run(next(run_dir.glob("run-*.wandb")))
    assert {key: run["config"][key] for key in PARAMS} == PARAMS
    assert [(h["_step"], h["grad_norm"]) for h in run["history"]] == [(1, 2.0), (2, 4.0), (3, 6.0)]
    assert run["history"][-1]["health/model.layers.7.q_proj/share_8"] == 0.25
    assert (run_dir / "files" / "loss_curve.png").read_bytes() == b"\x89PNG curve"


def test_a_tracker_that_cannot_start_or_log_is_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "no-such-scheme://tracker")
    warnings: list[str] = []
    trackers = Trackers(["mlflow"], TrackedRun("run-c", tmp_path, PARAMS), warn=warnings.append)
    trackers.log_metrics({"loss": 1.0}, 1)
    trackers.close()
    (warning,) = warnings
    assert warning.startswith("[moelora-ds] warning: train.report_to: mlflow could not start (")
    assert warning.endswith("the run goes on without it")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    warnings.clear()
    trackers = Trackers(["mlflow"], TrackedRun("run-d", tmp_path, PARAMS), warn=warnings.append)
    for experiment in (tmp_path / "mlruns").iterdir():  # the store vanishes under the run
        if experiment.is_dir() and experiment.name != ".trash":
            for run_dir in experiment.iterdir():
                if run_dir.is_dir():
                    import shutil

                    shutil.rmtree(run_dir)
    trackers.log_metrics({"loss": 1.0}, 1)
    trackers.log_metrics({"loss": 0.5}, 2)
    assert len(warnings) == 1 and "mlflow failed to log metrics" in warnings[0] and not trackers.active


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_a_requested_tracker_that_is_not_installed_is_a_configuration_error(name, monkeypatch):
    monkeypatch.setitem(sys.modules, PACKAGES[name], None)  # as if not installed: importing it fails
    assert not installed(name)
    config = load_config(None, [f"--train.report_to=[{name}]"])
    with pytest.raises(ConfigError, match=rf"train\.report_to: {name} is not installed; run `pip install "
                                          rf"moelora-ds\[{name}\]`"):
        check_report_to(config)


def test_by_default_tensorboard_reports_when_installed():
    assert requested(None) == (["tensorboard"] if installed("tensorboard") else [])
    assert requested([]) == []


def labelled_per_step(config: dict, world_size: int) -> list[int]:
    """The tokens each step's loss is taken over (labelled, after the shift), summed over ranks and micro-batches."""
    cfg = load_config_from_dict(config)
    tokenizer = load_tokenizer(Path(cfg.model.name_or_path))
    examples, _ = tokenize_as_configured(*load_records(cfg.data.train_path, cfg.data.format), tokenizer, cfg.data)
    shards = [iter(ShardedBatches(examples, micro_batch_size=cfg.train.micro_batch_size, rank=rank,
                                  world_size=world_size, seed=cfg.train.seed, shuffle=cfg.data.shuffle,
                                  max_length=cfg.data.max_length, pad_token_id=tokenizer.pad_token_id))
              for rank in range(world_size)]
    return [sum(int((next(shard)["labels"][:, 1:] != IGNORE_INDEX).sum()) for shard in shards
                for _ in range(cfg.train.grad_accum)) for _ in range(cfg.train.max_steps)]


@pytest.mark.distributed
def test_a_two_rank_run_records_its_step_figures_and_reports_to_mlflow_and_wandb(tiny_model_dir, tiny_mc_data,
                                                                                   tmp_path, subprocess_env):
    """ZeRO-0 (where DeepSpeed keeps no gradient norm and the trainer takes it) with clipping, 3 steps, expert health
    every 2 steps: the new figures in every record, the gradient norm before clipping as the single-process
    reference has it, and the same run in MLflow's local store and in W&B's offline files."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    config = run_config(tiny_model_dir, tiny_mc_data, out, deepspeed="ds_configs/zero0.json",
                        train={"max_steps": 3, "grad_clip": 0.5, "report_to": ["mlflow", "wandb"], "plots": True})
    config["health"] = {"every": 2}
    env = {key: value for key, value in subprocess_env.items() if not key.startswith(("MLFLOW_", "WANDB_"))}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    result = launch(config, tmp_path, env)
    assert "train.report_to" not in result.stdout + result.stderr  # no tracker warning

    records = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    reference = reference_run(config, 2)
    assert max(reference.grad_norms) > 0.5  # clipping acted: the record holds the norm before it
    assert [r["grad_norm"] for r in records] == pytest.approx(reference.grad_norms, rel=1e-5)
    assert [r["labelled_tokens"] for r in records] == labelled_per_step(config, 2)
    for record in records:
        assert record["step_time_s"] > 0 and 0.05 < record["peak_memory_gb"] < 64  # a rank's process: some 100s of MB
        assert record["tokens_per_s_per_device"] == pytest.approx(record["tokens_per_s"] / 2)
        assert "mfu" not in record  # no known peak on the CPU
    assert ["expert_share_max" in r for r in records] == [False, True, True]  # health.every=2 and the last step

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("moelora-ds").experiment_id])
    assert run.info.run_name == "out" and run.data.params["train.max_steps"] == "3"
    assert run.data.params["world_size"] == "2" and run.data.params["zero_stage"] == "0"
    history = client.get_metric_history(run.info.run_id, "grad_norm")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["grad_norm"])) for r in records]
    assert any(key.startswith("health/model.layers.1.self_attn.v_proj/share_") for key in run.data.metrics)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "loss_curve.png", "expert_health.png", "expert_health.json"}

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    wandb = wandb_run(next(run_dir.glob("run-*.wandb")))
    assert wandb["config"]["optimizer.name"] == "riemannian_adamw"
    logged = {h["_step"]: h for h in wandb["history"]}
    assert [logged[r["step"]]["grad_norm"] for r in records] == [pytest.approx(r["grad_norm"]) for r in records]
    assert {"loss_curve.png", "expert_health.png"} <= {path.name for path in (run_dir / "files").iterdir()}
