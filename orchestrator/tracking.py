"""The Tune callbacks a sweep adds: the trial-status gauge, and optional TensorBoard / MLflow export.

Imported only where the Tuner is built (it imports Ray Tune); the metrics themselves live in
``orchestrator/telemetry.py``, which workers import without Tune.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from orchestrator.spec import TrackingSpec
from orchestrator.telemetry import record_trial_statuses


class TrialStatusCallback(Callback):
    """Keeps ``unlearn_trials`` (trials per Tune state) current from the Tune driver's event loop."""

    def __init__(self, run_id: str, every_s: float = 1.0) -> None:
        self.run_id = run_id
        self.every_s = every_s  # the loop turns many times a second; the gauge needs no more than this
        self._last = float("-inf")

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            record_trial_statuses(self.run_id, [trial.status for trial in trials])

    def on_experiment_end(self, trials: list, **info) -> None:
        record_trial_statuses(self.run_id, [trial.status for trial in trials])


def mlflow_tracking_uri(tracking: TrackingSpec, run_dir: Path) -> str:
    """The spec's URI, else a SQLite store in the run directory (MLflow 3 refuses a plain file store
    unless MLFLOW_ALLOW_FILE_STORE=true; SQLite needs no server and stays with the run)."""
    return tracking.mlflow_tracking_uri or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def tune_callbacks(tracking: TrackingSpec, run_dir: Path, run_id: str, experiment: str) -> list[Any]:
    """Callbacks for ``RunConfig(callbacks=...)``: always the status gauge, the exporters when asked."""
    callbacks: list[Any] = [TrialStatusCallback(run_id)]
    if tracking.tensorboard:  # event files in each trial's directory under <run_dir>/tune
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    if tracking.mlflow:  # one MLflow run per trial, named like the trial, in experiment <spec name>
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(tracking_uri=mlflow_tracking_uri(tracking, run_dir),
                                              experiment_name=experiment, tags={"run_id": run_id}))
    return callbacks
