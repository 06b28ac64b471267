"""What a training run needs from its tracking backend, and how config keys become param names.

The driver and its callbacks talk to tracking only through ``Tracker``; the
buffered MLflow tracker (``pipeline.tracking.mlflow_tracker``) implements it.
Metric keys are ``scope/name`` (``train/loss``, ``val/accuracy``, ``time/pull_s``;
the README's "What MLflow gets" gives each one's meaning); params are the run
config flattened to dotted keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    """One run's params, tags, metrics and artifacts. Writes may be queued; reads see delivered data."""

    run_id: str

    @property
    def outages(self) -> int:
        """Times the backend became unreachable since this process opened the run."""
        ...

    def mark_running(self) -> None:
        """Reopen a resumed run."""
        ...

    def log_params(self, params: dict[str, str]) -> None: ...

    def set_tag(self, key: str, value: str) -> None: ...

    def log_table(self, data: dict[str, list[Any]], artifact_file: str) -> None:
        """Log columns ``data`` (equal lengths) as the table ``artifact_file`` (a .json)."""
        ...

    def log_input(self, name: str, uri: str, digest: str, context: str) -> None:
        """Record the data set at ``uri`` (a folder or s3://...) with ``digest`` as an input of the run for ``context``."""
        ...

    def log_model(self, name: str, artifacts: dict[str, str], **pyfunc: Any) -> None:
        """Log an MLflow pyfunc model of the run under ``name``; ``artifacts`` (name -> local folder) as they are now,
        ``pyfunc`` the other keyword arguments of ``mlflow.pyfunc.log_model``."""
        ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` (``scope/name`` keys) at ``step`` (the server version)."""
        ...

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        """Log one file as it is now (the caller may overwrite it at once)."""
        ...

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        """Log a directory as it is now (the caller may overwrite it at once)."""
        ...

    def download(self, artifact_path: str, dst: str | Path) -> Path:
        """Download the run's artifact ``artifact_path`` into ``dst``; return the local path (RunError when it cannot)."""
        ...

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """Every ``(step, value)`` logged for ``key`` in this run (earlier processes included), sorted by step."""
        ...

    def flush(self) -> None:
        """Block until every queued write is delivered; raises TrackingError when that cannot happen."""
        ...

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED) once every write is delivered."""
        ...


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> dotted keys with string values (the run's params)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)
    return out
