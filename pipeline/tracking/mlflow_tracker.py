"""MLflow tracking for one run, through an explicit client (no global active run).

Embedded default: a SQLite store ``sqlite:///mlflow.db`` in the working directory
with artifacts beside it; production: ``tracking.uri`` or $MLFLOW_TRACKING_URI
pointing at an ``mlflow server``. Implements ``pipeline.tracking.tracker.Tracker``.

Writes never block training: they go, in order, through a queue that one thread
delivers. While the server is unreachable the queue buffers them (artifacts as
snapshots on local disk) and the thread retries; ``flush`` waits until all is
delivered, at most ``tracking.outage_timeout_s``.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags

from pipeline.config import TrackingConfig
from pipeline.errors import RunError, TrackingError

DEFAULT_URI = "sqlite:///mlflow.db"
MAX_RETRY_WAIT_S = 10.0
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""The experiment tag that makes MLflow's UI open an experiment as model training (not GenAI evaluations)."""
MAX_BATCH_METRICS = 1000
"""MLflow's limit on metrics per log_batch; queued metric writes are merged up to it."""


def tracking_uri(config: TrackingConfig) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else the embedded SQLite store."""
    return config.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``mlruns/`` beside a SQLite database (MLflow's own
    default is ./mlruns in the working directory, wherever the database is); the server's choice otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


def is_transient(error: BaseException) -> bool:
    """Worth retrying: anything but a request the server refused as a client error (4xx, not 429) or a call
    that cannot succeed (TypeError, AttributeError: a bug, not an outage)."""
    if isinstance(error, (TypeError, AttributeError)):
        return False
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return not (400 <= status < 500 and status != 429)
    return True


@dataclass(frozen=True)
class _Write:
    """One queued write: what it is (for messages) and how to send it; metric writes carry their metrics."""

    what: str
    send: Callable[[MlflowClient], None]
    snapshot: Path | None = None
    metrics: tuple[Metric, ...] = ()


class MlflowTracker:
    """Logs one run's params, metrics and artifacts; creates the run or resumes ``run_id``."""

    def __init__(self, config: TrackingConfig, run_name: str, run_id: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        # The delivery thread retries on its own; MLflow's default (7 retries with exponential
        # backoff) would hold one write for minutes after the server is back.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        self.uri = tracking_uri(config)
        self.outage_timeout_s = config.outage_timeout_s
        self._client = MlflowClient(self.uri)
        if run_id is None:
            experiment = self._client.get_experiment_by_name(config.experiment)
            experiment_id = (
                experiment.experiment_id if experiment
                else self._client.create_experiment(config.experiment, artifact_location=artifact_location(self.uri))
            )
            if experiment is None or EXPERIMENT_KIND[0] not in experiment.tags:
                self._client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
            # The tags MLflow's own start_run sets: source name and type, user, git commit.
            self.run_id = self._client.create_run(experiment_id, run_name=run_name, tags=resolve_tags()).info.run_id
        else:
            try:
                self._client.get_run(run_id)
            except MlflowException as e:  # an unreachable server is an outage, waited out like any other
                if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                    raise RunError(f"run {run_id}: not found at {self.uri}") from None
            self.run_id = run_id
        self._queue: deque[_Write] = deque()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._failed: str | None = None
        self._spool: Path | None = None
        self.outages = 0

    # -- writes (queued) --------------------------------------------------------------------------

    def mark_running(self) -> None:
        """Reopen a resumed run (after its checkpoint was found usable)."""
        self._put("status RUNNING", lambda c: c.update_run(self.run_id, status="RUNNING"))

    def log_params(self, params: dict[str, str]) -> None:
        """Log params in batches of 100; values are cut to MLflow's 6000 characters."""
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            chunk = items[start : start + 100]
            self._put(f"{len(chunk)} params", lambda c, chunk=chunk: c.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` (``scope/name`` keys) at ``step``, timestamped now."""
        now = int(time.time() * 1000)
        batch = tuple(Metric(k, float(v), now, step) for k, v in metrics.items())
        self._put(f"metrics of step {step}", lambda c: c.log_batch(self.run_id, metrics=list(batch)), metrics=batch)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        """Log a directory as it is now (a snapshot is queued, so the caller may overwrite it)."""
        snapshot = self._snapshot(Path(local_dir))
        self._put(f"artifacts {artifact_path}", lambda c: c.log_artifacts(self.run_id, str(snapshot), artifact_path), snapshot)

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        """Log one file as it is now."""
        snapshot = self._snapshot(Path(local_file))
        file = snapshot / Path(local_file).name
        self._put(f"artifact {Path(local_file).name}", lambda c: c.log_artifact(self.run_id, str(file), artifact_path), snapshot)

    def set_tag(self, key: str, value: str) -> None:
        """Set one run tag."""
        self._put(f"tag {key}", lambda c: c.set_tag(self.run_id, key, value))

    def log_table(self, data: dict[str, list[Any]], artifact_file: str) -> None:
        """Log columns ``data`` as the table ``artifact_file`` (a .json), shown as a table in the UI."""
        self._put(f"table {artifact_file}", lambda c: c.log_table(self.run_id, data, artifact_file))

    def log_input(self, name: str, uri: str, digest: str, context: str) -> None:
        """Record the data set at ``uri`` (a local folder or s3://...) as an input of the run, used for ``context``."""
        source_type = uri.split("://", 1)[0] if "://" in uri else "local"
        dataset = Dataset(name=name, digest=digest, source_type=source_type, source=json.dumps({"uri": uri}))
        inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]
        self._put(f"input {name}", lambda c: c.log_inputs(self.run_id, datasets=inputs))

    def log_model(self, name: str, artifacts: dict[str, str], **pyfunc: Any) -> None:
        """Log an MLflow pyfunc model of the run, ``name`` in the UI's "Logged models"; ``artifacts`` (name -> local
        folder) as they are now, ``pyfunc`` the other keyword arguments of ``mlflow.pyfunc.log_model``."""
        snapshots = {key: str(self._snapshot(Path(path))) for key, path in artifacts.items()}

        created: list[str] = []  # the model's id once created, so that a retry after an outage fills the same model

        def send(client: MlflowClient) -> None:
            import mlflow.pyfunc
            from mlflow.models import Model
            from mlflow.tracking._tracking_service.utils import _use_tracking_uri

            if not created:  # in the run's experiment (Model.log alone would pick the process's current one)
                experiment_id = client.get_run(self.run_id).info.experiment_id
                created.append(client.create_logged_model(experiment_id, name=name, source_run_id=self.run_id).model_id)
            # Model.log resolves the store from the process-wide URI: set it for this call only, then restore it
            # (MLflow's own context manager; set_tracking_uri alone would leak into $MLFLOW_TRACKING_URI)
            with _use_tracking_uri(self.uri):
                Model.log(None, mlflow.pyfunc, name=name, run_id=self.run_id, model_id=created[0], artifacts=snapshots, **pyfunc)

        self._put(f"model {name}", send)

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ended and wait until every queued write is delivered."""
        status = RunStatus.to_string(RunStatus.from_string(status))
        self._put(f"status {status}", lambda c: c.set_terminated(self.run_id, status=status))
        self.flush()
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None

    # -- reads (direct) ---------------------------------------------------------------------------

    def download(self, artifact_path: str, dst: str | Path) -> Path:
        """Download the run's artifact ``artifact_path`` into ``dst`` (created); raises RunError naming both when it
        cannot (no such artifact, or the store unreachable)."""
        Path(dst).mkdir(parents=True, exist_ok=True)
        try:
            return Path(self._client.download_artifacts(self.run_id, artifact_path, str(dst)))
        except (MlflowException, OSError) as e:
            raise RunError(f"run {self.run_id} at {self.uri}: no {artifact_path} artifact ({e})") from None

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """Every ``(step, value)`` of ``key`` in the run, sorted; delivers the queued writes first (see ``flush``)."""
        self.flush()
        return sorted((m.step, m.value) for m in self._client.get_metric_history(self.run_id, key))

    # -- delivery ---------------------------------------------------------------------------------

    def flush(self) -> None:
        """Block until every queued write is delivered; TrackingError after ``outage_timeout_s`` of outage."""
        deadline = time.monotonic() + self.outage_timeout_s
        next_note = time.monotonic() + 30
        with self._changed:
            while self._queue and self._failed is None:
                now = time.monotonic()
                if now >= deadline:
                    raise TrackingError(
                        f"MLflow at {self.uri} unreachable for tracking.outage_timeout_s={self.outage_timeout_s:g} s; "
                        f"{len(self._queue)} writes of run {self.run_id} not delivered (first: {self._queue[0].what})"
                    )
                if now >= next_note:
                    print(f"waiting for MLflow at {self.uri}: {len(self._queue)} writes pending", file=sys.stderr)
                    next_note = now + 30
                self._changed.wait(timeout=1.0)
        self._raise_if_failed()

    @property
    def pending(self) -> int:
        """Writes queued and not yet delivered."""
        with self._changed:
            return len(self._queue)

    def _put(
        self, what: str, send: Callable[[MlflowClient], None], snapshot: Path | None = None, metrics: tuple[Metric, ...] = ()
    ) -> None:
        self._raise_if_failed()
        with self._changed:
            self._queue.append(_Write(what, send, snapshot, metrics))
            if self._thread is None:
                self._thread = threading.Thread(target=self._deliver, name="mlflow-delivery", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            raise TrackingError(self._failed)

    def _snapshot(self, path: Path) -> Path:
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix=f"metapipe-spool-{self.run_id[:8]}-"))
        target = Path(tempfile.mkdtemp(dir=self._spool))
        if path.is_dir():
            shutil.copytree(path, target, dirs_exist_ok=True)
        else:
            shutil.copy2(path, target / path.name)
        return target

    def _deliver(self) -> None:
        down_since: float | None = None
        wait = 0.5
        while True:
            with self._changed:
                while not self._queue:
                    self._changed.wait()
                writes = self._next_writes()
            write = writes[0]
            try:
                if len(writes) > 1:
                    self._client.log_batch(self.run_id, metrics=[m for w in writes for m in w.metrics])
                else:
                    write.send(self._client)
            except Exception as e:  # noqa: BLE001 - every failure is either retried or reported
                if not is_transient(e):
                    with self._changed:
                        self._failed = f"MLflow at {self.uri} refused {write.what} of run {self.run_id}: {e}"
                        self._changed.notify_all()
                    return
                if down_since is None:
                    down_since = time.monotonic()
                    self.outages += 1
                    print(
                        f"MLflow at {self.uri} unreachable ({type(e).__name__}); training goes on, writes are buffered "
                        f"({self.pending} pending) and retried",
                        file=sys.stderr,
                    )
                time.sleep(wait)
                wait = min(wait * 2, MAX_RETRY_WAIT_S)
                continue
            if down_since is not None:
                print(
                    f"MLflow at {self.uri} reachable again after {time.monotonic() - down_since:.0f} s; "
                    f"delivering {self.pending} buffered writes",
                    file=sys.stderr,
                )
                down_since = None
            wait = 0.5
            if write.snapshot is not None:
                shutil.rmtree(write.snapshot, ignore_errors=True)
            with self._changed:
                for _ in writes:
                    self._queue.popleft()
                self._changed.notify_all()

    def _next_writes(self) -> list[_Write]:
        """The head of the queue, merged with the metric writes that follow it (a backlog goes out in few calls)."""
        writes = [self._queue[0]]
        count = len(writes[0].metrics)
        for write in itertools.islice(self._queue, 1, None):
            if not count or not write.metrics or count + len(write.metrics) > MAX_BATCH_METRICS:
                break
            writes.append(write)
            count += len(write.metrics)
        return writes
