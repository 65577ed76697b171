"""MLflow: the run in the tracking store MLFLOW_TRACKING_URI names, else in a local store in the output directory
(OUTPUT_DIR/mlflow.db, artifacts in OUTPUT_DIR/mlartifacts), under MLFLOW_EXPERIMENT_NAME (default moelora-ds)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Mapping

from moelora_ds.telemetry.trackers import TrackedRun

DEFAULT_EXPERIMENT = "moelora-ds"
PARAM_VALUE_CHARS = 500
"""Longest parameter value every MLflow release stores (longer ones are cut)."""
BATCH = {"metrics": 1000, "params": 100}
"""The most metrics and parameters one `log_batch` request may carry."""


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class MLflowTracker:
    """One MLflow run, written through MlflowClient (no process-global active run)."""

    def __init__(self, run: TrackedRun) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        local = uri is None
        self.client = MlflowClient(tracking_uri=uri or f"sqlite:///{run.output_dir.resolve() / 'mlflow.db'}")
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            experiment_name, artifact_location=(run.output_dir.resolve() / "mlartifacts").as_uri() if local else None)
        self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
        params = [Param(key, str(value)[:PARAM_VALUE_CHARS]) for key, value in run.params.items()]
        for batch in chunks(params, BATCH["params"]):
            self.client.log_batch(self.run_id, params=batch)

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in values.items()]
        for batch in chunks(metrics, BATCH["metrics"]):
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_tracker(run: TrackedRun) -> MLflowTracker:
    return MLflowTracker(run)
