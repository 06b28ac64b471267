"""L2L through the real parameter server and worker on local Ray, tracked in MLflow, exported as a torch optimizer."""
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import validate
from pipeline.export.directory import load
from pipeline.runtime import driver
from tests.integration.test_driver import history, kill_at_step
from tests.pipeline.runtime.truncated_run import l2l_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


def test_l2l_trains_on_the_server_and_exports_a_torch_optimizer(tmp_path):
    config = validate(
        {
            "name": "test-l2l",
            "seed": 1,
            "task": {"name": "quadratic", "dim": 5},
            "store": {"path": str(tmp_path / "episodes"), "train_episodes": 200, "val_episodes": 10, "test_episodes": 10, "shard_episodes": 100},
            "algorithm": {"name": "l2l", "unroll": 10, "truncation": 5},
            "optimizer": {"lr": 0.01},
            "train": {"steps": 20, "meta_batch": 4, "workers": 1, "val_every": 10, "val_episodes": 10, "test_episodes": 10, "checkpoint_every": 10, "log_every": 1},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test"},
        }
    )
    result = driver.train(config, export_dir=tmp_path / "export", progress=False)
    assert result.steps == 20 and math.isfinite(result.test.mean)
    exported = load(tmp_path / "export")
    model = torch.nn.Linear(3, 1)
    optimizer = exported.optimizer(model.parameters())
    before = model.weight.detach().clone()
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    assert not torch.equal(model.weight, before) and torch.isfinite(model.weight).all()


def test_l2l_per_truncation_survives_a_worker_killed_mid_trajectory(tmp_path, monkeypatch):
    """Worker 1 killed at step 4, one truncation into its second trajectory: its replacement gets the carry and the
    run logs every step with the undisturbed run's loss."""
    reference = driver.train(l2l_config(tmp_path / "a", steps=8, val_every=8, checkpoint_every=8), progress=False)
    expected = history(MlflowClient(f"sqlite:///{tmp_path}/a/mlflow.db"), reference.run_id, "train/loss")
    killed = kill_at_step(4, lambda pool: pool.workers[1], monkeypatch)
    faulty = driver.train(l2l_config(tmp_path / "b", steps=8, val_every=8, checkpoint_every=8), progress=False)
    client = MlflowClient(f"sqlite:///{tmp_path}/b/mlflow.db")
    assert killed and faulty.steps == 8 and client.get_run(faulty.run_id).data.metrics["faults/worker_restarts"] == 1
    got = history(client, faulty.run_id, "train/loss")
    assert sorted(got) == list(range(1, 9))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-6), step
