"""The learning curve is drawn from the run's own metric history, through the Tracker protocol."""
from __future__ import annotations

from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.tracking.mlflow_tracker import MlflowTracker
from pipeline.tracking.plots import log_learning_curve


def test_the_learning_curve_includes_steps_logged_by_an_earlier_process(tmp_path):
    config = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t")
    first = MlflowTracker(config, "run")
    for step in range(1, 4):
        first.log_metrics({"train/loss": 1.0 / step}, step=step)
    first.finish("KILLED")
    resumed = MlflowTracker(config, "run", run_id=first.run_id)
    resumed.log_metrics({"train/loss": 0.2, "val/mse": 0.3}, step=4)
    assert resumed.metric_history("train/loss") == [(1, 1.0), (2, 0.5), (3, 1.0 / 3), (4, 0.2)]
    log_learning_curve(resumed, tmp_path)
    resumed.finish("FAILED")
    client = MlflowClient(config.uri)
    assert [a.path for a in client.list_artifacts(first.run_id, "plots")] == ["plots/learning_curve.png"]
    png = client.download_artifacts(first.run_id, "plots/learning_curve.png", str(tmp_path / "dl"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_steps_logs_no_curve(tmp_path):
    tracker = MlflowTracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t"), "run")
    log_learning_curve(tracker, tmp_path)
    tracker.finish("FAILED")
    assert MlflowClient(tracker.uri).list_artifacts(tracker.run_id, "plots") == []
