"""MLflow tracking for one run, through an explicit client (no global active run).

Embedded default: a SQLite store ``sqlite:///mlflow.db`` in the working directory
with artifacts beside it; production: ``tracking.uri`` or $MLFLOW_TRACKING_URI
pointing at an ``mlflow server``. Metric keys are ``scope/name`` (see README).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri(config: TrackingConfig) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else the embedded SQLite store."""
    return config.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> dotted keys with string values (MLflow params)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)
    return out


class Tracker:
    """Logs one run's params, metrics and artifacts; creates the run or resumes ``run_id``."""

    def __init__(self, config: TrackingConfig, run_name: str, run_id: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        self.uri = tracking_uri(config)
        self.client = MlflowClient(self.uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(config.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(config.experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        else:
            self.run_id = run_id

    def mark_running(self) -> None:
        """Reopen a resumed run (after its checkpoint was found usable)."""
        self.client.update_run(self.run_id, status="RUNNING")

    def log_params(self, params: dict[str, str]) -> None:
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_file), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def download(self, artifact_path: str, dst: str | Path) -> Path:
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(self.run_id, artifact_path, str(dst)))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=RunStatus.to_string(RunStatus.from_string(status)))
