"""End to end on a real local Ray: sinusoid MAML with 2 workers, MLflow (SQLite), export, resume, faults."""
import math
import os
import signal
import time
from typing import Any, Callable

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

import mlflow
from pipeline.errors import ConfigError, TrainingError
from pipeline.export.directory import load
from pipeline.runtime import driver
from pipeline.runtime.pool import RayPool
from tests.helpers import sleep_after_push
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
    with pytest.raises(ConfigError, match=r"config differs .*seed"):
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


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory) -> dict[int, float]:
    """Step -> train loss of an undisturbed 10-step run (the fault tests' reference, run once per module)."""
    path = tmp_path_factory.mktemp("undisturbed")
    reference = driver.train(sinusoid_config(path, steps=10, val_every=10, checkpoint_every=10), progress=False)
    return history(MlflowClient(f"sqlite:///{path}/mlflow.db"), reference.run_id, "train/loss")


def assert_same_losses(tmp_path, reference: dict[int, float], faulty) -> None:
    """Every step of the faulty run (tracked under ``tmp_path``) logged, each with the undisturbed run's loss."""
    b = history(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"), faulty.run_id, "train/loss")
    assert sorted(b) == sorted(reference)
    for step, loss in reference.items():
        assert b[step] == pytest.approx(loss, rel=1e-5), step


def test_a_killed_worker_is_replaced_and_no_step_is_lost(tmp_path, monkeypatch, undisturbed):
    """Kill a worker process mid-run: the run finishes with the same losses as an undisturbed run."""
    killed = kill_at_step(5, lambda pool: pool.workers[1], monkeypatch)
    faulty = driver.train(sinusoid_config(tmp_path, steps=10, val_every=10, checkpoint_every=10), progress=False)
    assert killed and faulty.steps == 10
    metrics = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(faulty.run_id).data.metrics
    assert metrics["faults/worker_restarts"] == 1 and "faults/server_restores" not in metrics  # logged from the first fault on
    assert_same_losses(tmp_path, undisturbed, faulty)


def test_a_killed_server_is_restored_from_the_last_checkpoint(tmp_path, monkeypatch, undisturbed):
    """Kill the server's process at step 7: it comes back from the checkpoint of step 5; steps 6-7 are redone."""
    killed = kill_at_step(7, lambda pool: pool.server, monkeypatch)
    faulty = driver.train(sinusoid_config(tmp_path, steps=10, val_every=10, checkpoint_every=5), progress=False)
    assert killed and faulty.steps == 10
    metrics = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(faulty.run_id).data.metrics
    assert metrics["faults/server_restores"] == 1 and metrics["faults/steps_redone"] == 2
    assert "faults/worker_restarts" not in metrics
    assert_same_losses(tmp_path, undisturbed, faulty)


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


@pytest.mark.parametrize("sent, status, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
                         ids=["ctrl-c", "sigterm"])
def test_sigint_or_sigterm_writes_a_checkpoint_and_marks_the_run_killed(tmp_path, sent, status, said):
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
    proc.send_signal(sent)
    proc.communicate(timeout=180)
    err = err_file.read_text()
    assert proc.returncode == status, err[-2000:]
    assert f"{said} at step" in err and "checkpoint written, run marked KILLED" in err
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


def hang_at_step(step: int, worker: int, monkeypatch, after_push: bool = False) -> list[int]:
    """Before the pool's step at server version ``step``, make worker ``worker`` hang once (the process stays alive,
    it answers nothing): its next read sleeps for an hour, or, ``after_push``, its next call sleeps an hour once
    its push has landed (the other workers' calls of that step run first, so that push completes the step)."""
    hung: list[int] = []
    original = RayPool.step_all

    def hang(episode_worker):
        class Asleep:
            def __next__(self):
                time.sleep(3600)

        episode_worker.reader = Asleep()

    def step_all_hanging_once(self):
        if hung or ray.get(self.server.version.remote()) != step:
            return original(self)
        ray.get(self.workers[worker].__ray_call__.remote(sleep_after_push() if after_push else hang))
        hung.append(step)
        if not after_push:
            return original(self)
        others = [self.result(i, self.submit(i)) for i in range(self.size) if i != worker]
        return sorted([*others, self.result(worker, self.submit(worker))], key=lambda report: report.worker_id)

    monkeypatch.setattr(RayPool, "step_all", step_all_hanging_once)
    return hung


def test_hung_workers_are_named_replaced_and_no_step_is_lost(tmp_path, monkeypatch, capfd, undisturbed):
    """A worker that stops answering (alive, asleep) is taken for hung after train.call_timeout_s, named,
    replaced like a dead one: at step 3 before its read, at step 6 after its push landed and completed the step
    (its redo pulls the parameters the hung call had and its push is not applied again); the run has the
    undisturbed run's losses."""
    at_read, after_push = hang_at_step(3, 1, monkeypatch), hang_at_step(6, 1, monkeypatch, after_push=True)
    config = sinusoid_config(tmp_path, steps=10, val_every=10, checkpoint_every=10, call_timeout_s=30)
    faulty = driver.train(config, progress=False)
    assert at_read == [3] and after_push == [6] and faulty.steps == 10
    assert capfd.readouterr().err.count("worker 1 failed (WorkerHung: worker 1 answered nothing in train.call_timeout_s=30); replacing it") == 2
    metrics = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(faulty.run_id).data.metrics
    assert metrics["faults/worker_restarts"] == 2 and metrics["server/duplicate_shares"] == 1
    assert_same_losses(tmp_path, undisturbed, faulty)


@pytest.mark.parametrize(
    "train, missing",
    [
        ({"resources_per_worker": {"tpu_pod": 1}}, r"missing tpu_pod \(needs 2 x 1 = 2, the cluster has 0\)"),
        ({"cpus_per_worker": 3}, r"missing CPU \(needs 2 x 3 = 6, the cluster has 2\)"),
    ],
    ids=["custom-resource", "more-cpus"],
)
def test_resources_that_never_appear_fail_within_the_timeout_naming_them(tmp_path, train, missing):
    config = sinusoid_config(tmp_path, steps=2, placement_timeout_s=2, **train)
    start = time.monotonic()
    with pytest.raises(TrainingError, match=r"train.placement_timeout_s=2: Ray did not place train.workers=2 .*" + missing):
        driver.train(config, progress=False)
    assert time.monotonic() - start < 60  # the store's precompute, then 2 s of waiting
    assert not (tmp_path / "mlflow.db").exists()  # refused before any MLflow run
    assert all(group["state"] == "REMOVED" for group in ray.util.placement_group_table().values())


def test_workers_on_ray_evaluate_to_the_numbers_of_the_driver(tmp_path):
    """Validation scored by two Ray workers equals evaluating every episode in this process."""
    from pipeline.build import build_learner
    from pipeline.evaluation import evaluate
    from pipeline.runtime.flat_buffer import Layout
    from pipeline.runtime.placement import Placement
    from pipeline.runtime.policy import FailurePolicy
    from pipeline.runtime.ray_env import start_ray
    from pipeline.runtime.server import ParameterServer
    from tasks.store.parquet import precompute

    config = sinusoid_config(tmp_path, steps=5)
    store = precompute(config, progress=False)
    learner = build_learner(config)
    layout = Layout.of(learner.init(config.seed))
    placement = Placement.reserve(config, start_ray(config))
    pool = RayPool(config, placement, ParameterServer.fresh(layout.flatten(learner.init(config.seed))), [None, None], FailurePolicy(3))
    try:
        pool.step_all()
        _, flat = pool.pull()
        expected = evaluate(learner, layout.unflatten(torch.from_numpy(flat.copy())), store.read_split("val"))
        assert pool.evaluate("val", 20, flat) == expected and expected.n == 20
    finally:
        pool.stop()
        placement.remove()
