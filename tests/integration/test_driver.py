"""End to end on a real local Ray: sinusoid MAML with 2 workers, MLflow (SQLite), export, resume, faults."""
import math
import os
import signal
from typing import Any, Callable

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

import mlflow
from pipeline.errors import TrainingError
from pipeline.export.directory import load
from pipeline.runtime import driver
from pipeline.runtime.pool import RayPool
from tests.pipeline.runtime.sinusoid_run import sinusoid_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


def history(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_train_two_workers_tracks_exports_and_serves(tmp_path):
    config = sinusoid_config(tmp_path, steps=150, val_every=50, checkpoint_every=50)
    result = driver.train(config, export_dir=tmp_path / "export", progress=False)
    client = MlflowClient(config.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and result.steps == 150
    loss = history(client, result.run_id, "train/loss")
    assert sorted(loss) == list(range(1, 151))
    first, last = sum(loss[s] for s in range(1, 11)) / 10, sum(loss[s] for s in range(141, 151)) / 10
    assert last < first
    assert set(history(client, result.run_id, "val/mse")) == {50, 100, 150}
    for key in ("time/compute_s", "time/pull_s", "time/push_s", "time/wait_s", "throughput/episodes_per_s", "server/staleness"):
        assert key in run.data.metrics
    assert run.data.params["algorithm.inner_lr"] == "0.01"
    assert math.isfinite(run.data.metrics["test/mse"]) and run.data.metrics["test/episodes"] == 40
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"checkpoints", "export", "plots", "test_results.json", "test_episodes.json"} <= artifacts
    assert {a.path for a in client.list_artifacts(result.run_id, "checkpoints")} == {"checkpoints/latest", "checkpoints/best"}

    learner = load(tmp_path / "export")
    x = torch.linspace(-5, 5, 10).unsqueeze(1)
    y = 2.0 * torch.sin(x - 0.5)
    predict = learner.adapt(x, y)
    assert predict(x).shape == (10, 1)

    mlflow.set_tracking_uri(config.tracking.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    out = model.predict({"support_x": x.numpy(), "support_y": y.numpy(), "query_x": x.numpy()})
    assert len(out) == 10


def test_resume_matches_an_uninterrupted_run(tmp_path):
    full = driver.train(sinusoid_config(tmp_path / "a", steps=12, val_every=6, checkpoint_every=6), progress=False)
    part_config = sinusoid_config(tmp_path / "b", steps=6, val_every=6, checkpoint_every=6)
    part = driver.train(part_config, progress=False)
    resumed = driver.train(sinusoid_config(tmp_path / "b", steps=12, val_every=6, checkpoint_every=6), resume=part.run_id, progress=False)
    assert resumed.run_id == part.run_id and resumed.steps == 12
    a = history(MlflowClient(f"sqlite:///{tmp_path}/a/mlflow.db"), full.run_id, "train/loss")
    b = history(MlflowClient(part_config.tracking.uri), part.run_id, "train/loss")
    for step in range(7, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_resume_with_another_config_is_refused(tmp_path):
    part = driver.train(sinusoid_config(tmp_path, steps=2, val_every=2, checkpoint_every=2), progress=False)
    changed = sinusoid_config(tmp_path, steps=4, val_every=2, checkpoint_every=2).model_copy(update={"seed": 4})
    with pytest.raises(TrainingError, match=r"config differs .*seed"):
        driver.train(changed, resume=part.run_id, progress=False)


def actor_pid(actor: Any) -> int:
    """The process of a Ray actor, asked from the test side (the actor itself has no such method)."""
    return ray.get(actor.__ray_call__.remote(lambda _: os.getpid()))


def kill_at_step(step: int, actor_of: Callable[[RayPool], Any], monkeypatch) -> list[int]:
    """Before the pool's step at server version ``step``, SIGKILL the process of ``actor_of(pool)`` once."""
    killed: list[int] = []
    original = RayPool.step_all

    def step_all_killing_once(self):
        if not killed and ray.get(self.server.version.remote()) == step:
            killed.append(actor_pid(actor_of(self)))
            os.kill(killed[0], signal.SIGKILL)
        return original(self)

    monkeypatch.setattr(RayPool, "step_all", step_all_killing_once)
    return killed


def assert_same_losses(tmp_path, reference, faulty, steps: int) -> None:
    """Every step of the faulty run logged, each with the undisturbed run's loss."""
    a = history(MlflowClient(f"sqlite:///{tmp_path}/a/mlflow.db"), reference.run_id, "train/loss")
    b = history(MlflowClient(f"sqlite:///{tmp_path}/b/mlflow.db"), faulty.run_id, "train/loss")
    assert sorted(b) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_a_killed_worker_is_replaced_and_no_step_is_lost(tmp_path, monkeypatch):
    """Kill a worker process mid-run: the run finishes with the same losses as an undisturbed run."""
    train = dict(steps=10, val_every=10, checkpoint_every=10)
    reference = driver.train(sinusoid_config(tmp_path / "a", **train), progress=False)
    killed = kill_at_step(5, lambda pool: pool.workers[1], monkeypatch)
    faulty = driver.train(sinusoid_config(tmp_path / "b", **train), progress=False)
    assert killed and faulty.steps == 10
    metrics = MlflowClient(f"sqlite:///{tmp_path}/b/mlflow.db").get_run(faulty.run_id).data.metrics
    assert metrics["faults/worker_restarts"] == 1 and "faults/server_restores" not in metrics  # logged from the first fault on
    assert_same_losses(tmp_path, reference, faulty, 10)


def test_a_killed_server_is_restored_from_the_last_checkpoint(tmp_path, monkeypatch):
    """Kill the server's process at step 7: it comes back from the checkpoint of step 5; steps 6-7 are redone."""
    train = dict(steps=10, val_every=10, checkpoint_every=5)
    reference = driver.train(sinusoid_config(tmp_path / "a", **train), progress=False)
    killed = kill_at_step(7, lambda pool: pool.server, monkeypatch)
    faulty = driver.train(sinusoid_config(tmp_path / "b", **train), progress=False)
    assert killed and faulty.steps == 10
    metrics = MlflowClient(f"sqlite:///{tmp_path}/b/mlflow.db").get_run(faulty.run_id).data.metrics
    assert metrics["faults/server_restores"] == 1 and metrics["faults/steps_redone"] == 2
    assert "faults/worker_restarts" not in metrics
    assert_same_losses(tmp_path, reference, faulty, 10)
    assert faulty.test.mean == pytest.approx(reference.test.mean, rel=1e-5)


def test_nonfinite_gradients_stop_the_run_with_a_checkpoint_of_good_params(tmp_path):
    config = sinusoid_config(tmp_path, steps=50, val_every=50, checkpoint_every=50, max_bad_grads=3)
    config = config.model_copy(update={"algorithm": config.algorithm.model_copy(update={"inner_lr": 1e30})})
    with pytest.raises(TrainingError, match=r"\d+ rejected gradients in a row \(train.max_bad_grads=3\).*non-finite"):
        driver.train(config, progress=False)
    client = MlflowClient(config.tracking.uri)
    run = client.search_runs(client.get_experiment_by_name("test").experiment_id)[0]
    assert run.info.status == "FAILED"
    from pipeline.runtime import checkpoint

    saved = checkpoint.load(client.download_artifacts(run.info.run_id, "checkpoints/latest", str(tmp_path / "dl")))
    assert saved.server.version == 0 and saved.server.rejected_nonfinite >= 3
    assert torch.isfinite(saved.server.params).all()


def test_sigint_writes_a_checkpoint_and_marks_the_run_killed(tmp_path):
    import re
    import subprocess
    import sys
    import time

    import yaml

    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    cfg = sinusoid_config(tmp_path, steps=100000, val_every=1000, checkpoint_every=1000).model_dump(mode="json")
    cfg["train"]["workers"] = 1
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(repo), "RAY_USAGE_STATS_ENABLED": "0"}
    err_file = tmp_path / "stderr.txt"
    # stderr (the progress bar) goes to a file: a pipe nobody reads would fill up and block the run.
    with open(err_file, "w") as err_sink:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", str(tmp_path / "run.yaml")], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=err_sink, text=True,
                                # A shell's background jobs inherit SIGINT ignored; give the run a terminal's default.
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Ray may forward worker output to the driver's stdout before the run id line.
    run_id = next(m.group(1) for line in proc.stdout if (m := re.match(r"run_id: (\w+)", line)))
    client = MlflowClient(cfg["tracking"]["uri"])
    deadline = time.time() + 180
    while not client.get_metric_history(run_id, "train/loss") and time.time() < deadline:
        time.sleep(1)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=180)
    err = err_file.read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint written, run marked KILLED" in err
    assert client.get_run(run_id).info.status == "KILLED"
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} >= {"checkpoints/latest"}


def test_async_mode_applies_every_step_and_logs_staleness(tmp_path):
    config = sinusoid_config(tmp_path, steps=20, val_every=20, checkpoint_every=20, mode="async", max_staleness=1)
    result = driver.train(config, progress=False)
    client = MlflowClient(config.tracking.uri)
    assert result.steps == 20 and client.get_run(result.run_id).info.status == "FINISHED"
    staleness = history(client, result.run_id, "server/staleness")
    # A step's metrics are logged at the server version seen after its push, which another worker's push
    # may already have moved on, so a few versions can go unlogged.
    assert 20 in staleness and set(staleness) <= set(range(1, 21)) and len(staleness) >= 10
    # a push staler than train.max_staleness is reported with its staleness, rejected and counted
    rejected = history(client, result.run_id, "server/rejected_stale")
    assert all(0 <= s <= 1 or rejected.get(step, 0) > 0 for step, s in staleness.items()), (staleness, rejected)
