"""Each step callback alone, on an in-process pool and a real MLflow run on SQLite."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline.build import build_learner
from pipeline.runtime import checkpoint
from pipeline.runtime.callbacks import (
    Checkpoints,
    LearningCurve,
    MetricsLog,
    PeriodicCheckpoint,
    RestorePoint,
    StepEnd,
    Validation,
)
from pipeline.runtime.flat_buffer import Layout
from pipeline.runtime.local import LocalPool
from pipeline.runtime.server import ParameterServer
from pipeline.tracking.mlflow_tracker import MlflowTracker
from tasks.store.parquet import precompute
from tests.pipeline.runtime.sinusoid_run import sinusoid_config


@pytest.fixture
def run(tmp_path):
    """A config, an in-process pool after one step, its checkpoints and tracker."""
    config = sinusoid_config(tmp_path, train_episodes=1000, steps=10)
    store = precompute(config)
    learner = build_learner(config)
    layout = Layout.of(learner.init(config.seed))
    state = ParameterServer.fresh(layout.flatten(learner.init(config.seed)))
    pool = LocalPool(config, state, [None, None])
    reports = pool.step_all()
    tracker = MlflowTracker(config.tracking, "callbacks")
    checkpoints = Checkpoints(pool, tracker, tmp_path / "scratch", config, None, RestorePoint(state, [None, None]))
    yield config, store, learner, layout, pool, reports, tracker, checkpoints
    pool.stop()


def step(version, reports, last=False, **metrics):
    return StepEnd(version, last, reports, {"throughput/episodes_per_s": 10.0, **metrics})


def test_validation_runs_every_n_steps_and_at_the_last_and_keeps_the_best(run):
    config, _, learner, _, pool, reports, tracker, checkpoints = run
    validation = Validation(20, 2, pool, checkpoints, learner)
    skipped = step(1, reports)
    validation.on_step(skipped)
    assert "val/best" not in skipped.metrics
    checkpoints.best_val = 1e9  # anything beats it
    done = step(1, reports, last=True)
    validation.on_step(done)
    assert done.metrics["val/best"] == done.metrics["val/mse"] == checkpoints.best_val and "val/mse_ci95" in done.metrics
    tracker.flush()
    best = checkpoint.load(tracker.download("checkpoints/best", config.store.path + "-dl"))
    assert best.server.version == 1 and best.best_val == done.metrics["val/mse"] and best.positions == pool.positions
    checkpoints.best_val = -1.0  # nothing beats it
    again = step(2, reports)
    validation.on_step(again)
    assert again.metrics["val/best"] == -1.0


def test_metrics_are_logged_every_n_steps_at_the_last_and_with_validation(run):
    *_, reports, tracker, _ = run
    log = MetricsLog(tracker, 3)
    for version, last, extra in [(1, False, {}), (2, False, {"val/best": 0.5}), (3, False, {}), (4, True, {})]:
        log.on_step(step(version, reports, last, **{"train/loss": float(version), **extra}))
    assert tracker.metric_history("train/loss") == [(2, 2.0), (3, 3.0), (4, 4.0)]
    assert tracker.metric_history("faults/tracking_outages") == []  # a counter is logged from its first fault on
    tracker.outages = 1
    log.on_step(step(6, reports, **{"train/loss": 6.0}))
    assert tracker.metric_history("faults/tracking_outages") == [(6, 1.0)]


def test_the_learning_curve_is_drawn_at_every_validation(run, tmp_path):
    *_, reports, tracker, _ = run
    curve = LearningCurve(tracker, tmp_path, {"train/loss": [(1, 2.0)]})
    curve.on_step(step(2, reports, **{"train/loss": 1.0}))
    assert not MlflowClient(tracker.uri).list_artifacts(tracker.run_id, "plots")
    curve.on_step(step(3, reports, **{"train/loss": 0.5, "val/mse": 0.7, "val/best": 0.7}))
    tracker.flush()
    assert [a.path for a in MlflowClient(tracker.uri).list_artifacts(tracker.run_id, "plots")] == ["plots/learning_curve.png"]


def test_a_periodic_checkpoint_becomes_the_restore_point(run):
    config, *_, pool, reports, tracker, checkpoints = run
    periodic = PeriodicCheckpoint(checkpoints, 2)
    periodic.on_step(step(1, reports))
    assert checkpoints.restore_point.state.version == 0
    periodic.on_step(step(1, reports, last=True))
    assert checkpoints.restore_point.state.version == 1 and checkpoints.restore_point.positions == pool.positions
    tracker.finish()
    paths = {a.path for a in MlflowClient(config.tracking.uri).list_artifacts(tracker.run_id, "checkpoints")}
    assert paths == {"checkpoints/latest"}
