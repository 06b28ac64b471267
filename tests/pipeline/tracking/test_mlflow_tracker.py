"""The tracker's queued delivery on the embedded SQLite store; the outage with a real server is in
tests/integration/test_mlflow_outage.py."""
from __future__ import annotations

import socket

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.errors import TrackingError
from pipeline.tracking.mlflow_tracker import MlflowTracker, is_transient
from pipeline.tracking.tracker import flatten


def sqlite_tracker(tmp_path, **config) -> MlflowTracker:
    return MlflowTracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t", **config), "run")


def test_flatten_gives_dotted_string_params():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "None"}


def test_client_errors_are_permanent_and_everything_else_is_retried():
    assert not is_transient(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))
    assert is_transient(MlflowException("server error", error_code=INTERNAL_ERROR))
    assert is_transient(requests.exceptions.ConnectionError("refused"))
    assert is_transient(OSError("network is unreachable"))


def test_writes_are_delivered_in_order_and_finish_waits_for_them(tmp_path):
    tracker = sqlite_tracker(tmp_path)
    for step in range(1, 51):
        tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
    tracker.set_tag("k", "v")
    tracker.finish("FINISHED")
    assert tracker.pending == 0
    client = MlflowClient(tracker.uri)
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / s) for s in range(1, 51)]
    assert tracker.metric_history("train/loss") == [(s, 1.0 / s) for s in range(1, 51)]
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["k"] == "v"


def test_an_artifact_is_logged_as_it_was_when_queued(tmp_path):
    tracker = sqlite_tracker(tmp_path)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "state.json").write_text("step 5")
    tracker.log_artifacts(folder, "checkpoints/latest")
    (folder / "state.json").write_text("step 10")  # the caller overwrites its folder at once
    tracker.finish()
    got = MlflowClient(tracker.uri).download_artifacts(tracker.run_id, "checkpoints/latest", str(tmp_path / "dl"))
    assert (tmp_path / "dl" / "latest" / "state.json").read_text() == "step 5", got


def test_a_refused_write_fails_the_next_call_naming_it(tmp_path):
    tracker = sqlite_tracker(tmp_path)
    tracker.log_params({"lr": "0.1"})
    tracker.log_params({"lr": "0.2"})  # MLflow refuses to change a param
    with pytest.raises(TrackingError, match=r"refused 1 params of run \w+"):
        tracker.flush()
    with pytest.raises(TrackingError, match="refused"):
        tracker.log_metrics({"x": 1.0}, step=1)


def test_an_unreachable_server_times_out_naming_what_was_not_delivered(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    config = TrackingConfig(uri=f"http://127.0.0.1:{port}", experiment="t", outage_timeout_s=2)
    tracker = MlflowTracker(config, "run", run_id="0" * 32)  # a resumed run: no request at construction
    tracker.log_metrics({"train/loss": 1.0}, step=7)
    with pytest.raises(TrackingError, match=r"unreachable for tracking.outage_timeout_s=2 s; 1 writes .*metrics of step 7"):
        tracker.flush()
    assert tracker.outages == 1 and tracker.pending == 1


def test_an_unknown_run_and_a_missing_artifact_are_run_errors(tmp_path):
    from pipeline.config import TrackingConfig
    from pipeline.errors import RunError
    from pipeline.tracking.mlflow_tracker import MlflowTracker

    config = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(RunError, match="run nonexistent: not found at sqlite:///"):
        MlflowTracker(config, "x", run_id="nonexistent")
    tracker = MlflowTracker(config, "x")
    with pytest.raises(RunError, match=f"run {tracker.run_id} at .*: no checkpoints/latest artifact"):
        tracker.download("checkpoints/latest", tmp_path / "d")
    tracker.finish("FINISHED")


def test_a_sqlite_store_keeps_its_artifacts_beside_the_database(tmp_path):
    from pipeline.config import TrackingConfig
    from pipeline.tracking.mlflow_tracker import MlflowTracker

    (tmp_path / "elsewhere").mkdir()
    tracker = MlflowTracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/elsewhere/mlflow.db"), "x")
    (tmp_path / "a.txt").write_text("a")
    tracker.log_artifact(tmp_path / "a.txt")
    tracker.finish("FINISHED")
    assert list((tmp_path / "elsewhere" / "mlruns").rglob("a.txt")) and not (tmp_path / "mlruns").exists()
