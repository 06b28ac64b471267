"""The MLflow server goes away mid-run and comes back: training goes on, nothing is lost.

A real ``mlflow server`` (mlflow/server.sh, SQLite backend, artifacts on local disk) is stopped
once the run has logged a few steps and restarted on the same port and database after the
training loop has finished; the run then delivers what it buffered and ends normally.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from mlflow.tracking import MlflowClient

from pipeline.runtime import checkpoint
from tests.helpers import ROOT, base_env, free_port, http_ok, stop_tree, wait_until

pytestmark = pytest.mark.integration

STEPS = 60


class Server:
    """mlflow/server.sh on one port and database, started and stopped at will."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.env = base_env(folder) | {
            "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{folder / 'mlflow.db'}",
            "MLFLOW_ARTIFACTS_DESTINATION": str(folder / "artifacts"),
            "MLFLOW_PORT": str(self.port),
        }
        self.log = folder / "mlflow.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                [str(ROOT / "mlflow" / "server.sh")], env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_until(lambda: http_ok(f"{self.uri}/health"), "mlflow server", 120, self.process, self.log)

    def stop(self) -> None:
        if self.process is not None:
            stop_tree(self.process.pid)
            self.process = None


@pytest.fixture
def folder() -> Iterator[Path]:
    """A short folder: the run's TMPDIR is in it, and Ray's socket paths under TMPDIR must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="mp-out-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_run_survives_an_mlflow_outage_and_loses_nothing(folder: Path) -> None:
    tmp_path = folder
    server = Server(tmp_path)
    server.start()
    env = base_env(tmp_path) | {"MLFLOW_TRACKING_URI": server.uri}
    overrides = [
        "name=outage", f"store.path={tmp_path / 'episodes'}", "store.train_episodes=400", "store.val_episodes=8",
        "store.test_episodes=8", "store.shard_episodes=200", f"train.steps={STEPS}", "train.meta_batch=4",
        "train.val_every=20", "train.val_episodes=8", "train.test_episodes=8", "train.checkpoint_every=20",
        "train.log_every=1", "tracking.experiment=outage",
    ]
    stdout, stderr = tmp_path / "train.out", tmp_path / "train.err"
    command = [sys.executable, "-m", "pipeline", "train", "configs/sinusoid_maml.yaml"]
    command += [arg for item in overrides for arg in ("--set", item)]
    with stdout.open("w") as out, stderr.open("w") as err:
        train = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)
    try:
        client = MlflowClient(server.uri)

        def logged_steps() -> int:
            run_id = stdout.read_text().split("run_id: ")[1].split()[0]
            return len(client.get_metric_history(run_id, "train/loss"))

        wait_until(lambda: logged_steps() >= 3, "the run's first steps", 180, train, stderr)
        server.stop()
        # The loop runs to its end with the server down (tqdm's last update reads 60/60), then waits.
        wait_until(lambda: f"{STEPS}/{STEPS}" in stderr.read_text(), "the training loop's end", 300, train, stderr)
        time.sleep(2)
        assert train.poll() is None, stderr.read_text()[-3000:]  # still waiting to deliver, not failed
        server.start()
        assert train.wait(timeout=300) == 0, stderr.read_text()[-3000:]
    finally:
        if train.poll() is None:
            train.kill()
        server.stop()

    log = stderr.read_text()
    assert log.count(" unreachable (") == 1 and log.count("reachable again") == 1, log[-3000:]
    server.start()
    try:
        client = MlflowClient(server.uri)
        run_id = stdout.read_text().split("run_id: ")[1].split()[0]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
        assert steps == list(range(1, STEPS + 1))  # every step once: nothing lost, nothing doubled
        outages = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "faults/tracking_outages"))
        assert [v for _, v in outages] == sorted(v for _, v in outages) and {v for _, v in outages} <= {0.0, 1.0}
        assert "test/mse" in run.data.metrics
        saved = checkpoint.load(client.download_artifacts(run_id, "checkpoints/latest", str(tmp_path / "dl")))
        assert saved.server.version == STEPS
        assert {a.path for a in client.list_artifacts(run_id)} >= {"checkpoints", "export", "plots", "test_results.json"}
        (model,) = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
        assert model.name == "model"  # logged once, through the outage
    finally:
        server.stop()
