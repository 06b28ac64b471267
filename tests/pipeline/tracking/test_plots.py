"""The figures: the learning curve from the run's own metric history (through the Tracker protocol), the episodes
a run is fed, regression fits."""
from __future__ import annotations

import torch
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.tracking.mlflow_tracker import MlflowTracker
from pipeline.tracking.plots import episodes_figure, log_learning_curve, regression_fits
from tasks.episodes import Episodes


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


def sinusoid_episodes(count: int) -> Episodes:
    x = torch.linspace(-5, 5, 10).repeat(count, 1).unsqueeze(-1)
    y = torch.sin(x + torch.arange(count).reshape(count, 1, 1))
    return Episodes(x[:, ::2], y[:, ::2], x[:, 1::2], y[:, 1::2])


def image_episodes(count: int) -> Episodes:
    images = torch.rand(count, 6, 1, 28, 28)
    labels = torch.arange(3).repeat(count, 2)
    return Episodes(images[:, :3], labels[:, :3], images[:, 3:], labels[:, 3:])


def test_episodes_are_drawn_for_images_and_curves_and_not_for_optimizees():
    assert len(episodes_figure({"train": image_episodes(2), "test": image_episodes(2)}).axes) == 2
    assert len(episodes_figure({"train": sinusoid_episodes(4), "test": sinusoid_episodes(3)}).axes) == 8
    quadratics = Episodes(torch.randn(2, 10, 10), torch.randn(2, 10), torch.randn(2, 10, 10), torch.randn(2, 10))
    assert episodes_figure({"train": quadratics}) is None


def test_regression_fits_draw_the_adapted_prediction_over_each_episode():
    adapted = []

    def adapt(support_x, support_y):
        adapted.append(support_x.shape)
        return lambda x: 2 * x

    figure = regression_fits(sinusoid_episodes(6), adapt, count=3)
    assert len(figure.axes) == 3 and adapted == [(5, 1)] * 3
    line = figure.axes[0].lines[0]
    assert torch.allclose(torch.as_tensor(line.get_ydata()), 2 * torch.as_tensor(line.get_xdata()))
    assert line.get_xdata()[0] == -5 and line.get_xdata()[-1] == 5
    assert regression_fits(image_episodes(2), adapt) is None
