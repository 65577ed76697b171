"""Experiment trackers rank 0 reports a run to (`train.report_to`): TensorBoard, MLflow, Weights & Biases.

Each backend is a small module (`<name>_tracker.py`) whose `open_tracker(run)` returns a `Tracker`;
`Trackers` opens the configured ones and passes them the metrics and the run's artifacts. A tracker
that fails to start or to log is dropped with a warning: the training run never stops for one.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Protocol, Sequence

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from moelora_ds.config import TrainLoopConfig

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
"""The package each tracker needs (installed by the moelora-ds extra of the tracker's name)."""


@dataclass
class TrackedRun:
    """What a tracker is told about the run when it starts."""
    name: str
    """The run's name (train.run_name, else the output directory's name)."""
    output_dir: Path
    """The run's output directory (where local tracker files go unless the tracker is told otherwise)."""
    params: dict[str, object]
    """The run's full configuration, flattened to dotted keys."""


class Tracker(Protocol):
    """One experiment tracker's run."""

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        """Numbers of `step`, by name."""

    def log_artifact(self, path: Path) -> None:
        """A file the run produced (loss curve, heat map)."""

    def close(self) -> None:
        """End the run."""


def installed(name: str) -> bool:
    """Whether the package tracker `name` needs is importable."""
    return importlib.util.find_spec(PACKAGES[name]) is not None


def requested(report_to: Optional[Sequence[str]]) -> list[str]:
    """The trackers a run reports to: `train.report_to`, or when null TensorBoard if it is installed."""
    if report_to is None:
        return ["tensorboard"] if installed("tensorboard") else []
    return list(report_to)


def missing(report_to: Optional[Sequence[str]]) -> list[str]:
    """The requested trackers whose package is not installed."""
    return [name for name in requested(report_to) if not installed(name)]


def flatten(values: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested mappings as one level of dotted keys (`train.lr`); lists and other values are kept as they are."""
    flat: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def numbers(values: Mapping[str, object]) -> dict[str, float]:
    """The entries of a metrics record a tracker can plot (ints and floats; not strings, lists or mappings)."""
    return {key: value for key, value in values.items() if isinstance(value, (int, float))}


class Trackers:
    """The trackers of one run on rank 0; each failure drops that tracker with one warning naming it."""

    def __init__(self, names: Sequence[str], run: TrackedRun, warn: Callable[[str], None] = tqdm.write) -> None:
        self.warn = warn
        self.active: dict[str, Tracker] = {}
        for name in names:
            try:
                module = importlib.import_module(f"{__name__}.{name}_tracker")
                self.active[name] = module.open_tracker(run)
            except Exception as error:  # a tracker must never end the run
                self._warn(name, "could not start", error)

    def _warn(self, name: str, what: str, error: BaseException) -> None:
        self.warn(f"[moelora-ds] warning: train.report_to: {name} {what} ({type(error).__name__}: {error}); "
                  f"the run goes on without it")

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for name, tracker in list(self.active.items()):
            try:
                call(tracker)
            except Exception as error:  # a tracker must never end the run
                del self.active[name]
                self._warn(name, f"failed to {what}", error)

    def log_metrics(self, values: Mapping[str, object], step: int) -> None:
        """The numbers among `values` to every tracker."""
        plotted = numbers(values)
        if plotted:
            self._each("log metrics", lambda tracker: tracker.log_metrics(plotted, step))

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        """The files among `paths` that exist, to every tracker."""
        for path in (Path(p) for p in paths):
            if path.is_file():
                self._each(f"upload {path.name}", lambda tracker, path=path: tracker.log_artifact(path))

    def close(self) -> None:
        self._each("close", lambda tracker: tracker.close())
        self.active.clear()


def open_trackers(train: TrainLoopConfig, output_dir: Path, run_info: Mapping) -> Trackers:
    """Rank 0's trackers of `train.report_to`, told the run's name (`train.run_name`, else the output directory's) and
    its flattened configuration with the ranks' layout (`run_info` as checkpoints record it)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    info = dict(run_info)
    params = {**flatten(info.pop("config")), **info}
    return Trackers(requested(train.report_to), TrackedRun(train.run_name or output_dir.resolve().name, output_dir,
                                                            params))
