"""A Ray cluster of three nodes on 127.0.0.1 (ray.cluster_utils.Cluster: a head and two worker nodes, each with
its own resources), the episode store on S3 (moto): workers spread over the nodes; a whole node killed mid-run,
after its worker's push landed and before its reply came, has its worker replaced on the node left and the step
redone once, with every step's loss equal to an undisturbed run's; a local store.path is refused before the run
starts. Heavy (three raylets): run it alone."""
from __future__ import annotations

import os
import re
import secrets
import time
from typing import Any

import pytest
import ray
from mlflow.tracking import MlflowClient

from pipeline.config import validate
from pipeline.errors import TrainingError
from pipeline.runtime import driver
from pipeline.runtime.pool import RayPool
from pipeline.runtime.system_metrics import NODE_ACTOR, SystemMetrics, node_names
from tests.helpers import ROOT, moto_s3, sleep_after_push, wait_until
from tests.pipeline.runtime.sinusoid_run import sinusoid_config

pytestmark = pytest.mark.integration

STEPS = 6


@pytest.fixture(scope="module")
def cluster():
    """moto's S3 server with a bucket ``episodes``, then a head (no worker slots) and two nodes of 1 CPU and 2
    worker slots each; the environment (S3 endpoint, RAY_ADDRESS) points at them, as a user's shell would."""
    from ray.cluster_utils import Cluster

    # the environment is set before the nodes start: their workers inherit the S3 endpoint and credentials
    with moto_s3("episodes", RAY_USAGE_STATS_ENABLED="0"), pytest.MonkeyPatch.context() as patch:
        fast_death = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}  # a dead node noticed in ~2 s
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": fast_death})
        nodes = [cluster.add_node(num_cpus=1, resources={"worker_slot": 2}) for _ in range(2)]
        cluster.wait_for_nodes()
        patch.setenv("RAY_ADDRESS", cluster.address)
        try:
            yield cluster, nodes
        finally:
            ray.shutdown()
            cluster.shutdown()


def run_config(tmp_path, store_path: str):
    """Two workers SPREAD over the nodes, half a CPU and one worker slot each (both fit on one node)."""
    raw = sinusoid_config(tmp_path, train_episodes=1000, steps=STEPS, val_every=STEPS, checkpoint_every=STEPS).model_dump(mode="json")
    raw["store"]["path"] = store_path
    raw["train"] |= {"placement": "SPREAD", "cpus_per_worker": 0.5, "resources_per_worker": {"worker_slot": 1}}
    return validate(raw)


def node_of(actor: Any) -> str:
    return ray.get(actor.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()))


def losses(tmp_path, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(run_id, "train/loss")}


def test_a_local_store_on_several_nodes_is_refused_before_the_run(cluster, tmp_path):
    config = run_config(tmp_path, str(tmp_path / "episodes"))
    with pytest.raises(TrainingError, match=r"store.path='.*episodes' is local to one node, the Ray cluster has 3"):
        driver.train(config, progress=False)
    assert not (tmp_path / "episodes").exists() and not (tmp_path / "mlflow.db").exists()


def test_every_other_node_logs_system_metrics_under_its_name(cluster, mlflow_server):
    """MLflow's system metrics of a cluster tracked by a server: the driver's node under system/, each other node
    under system/<node>/ (through an actor pinned to it), stopped and killed with the run."""
    if not ray.is_initialized():
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    two_nodes = cluster[1][0].node_id
    client = MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment(f"system-metrics-{secrets.token_hex(4)}")).info.run_id
    name = node_names(ray.nodes())[two_nodes]
    assert name == f"{ray.util.get_node_ip_address()}-{two_nodes[:8]}"  # both nodes of this machine share its address
    monitors = SystemMetrics(run_id, mlflow_server, interval_s=0.5)
    keys = (f"system/{name}/cpu_utilization_percentage", "system/cpu_utilization_percentage")
    deadline = time.monotonic() + 90
    while not set(keys) <= set(client.get_run(run_id).data.metrics) and time.monotonic() < deadline:
        time.sleep(0.5)
    monitors.stop()
    metrics = client.get_run(run_id).data.metrics
    assert all(0 <= metrics[key] <= 100 for key in keys), sorted(metrics)
    assert f"system/{name}/system_memory_usage_megabytes" in metrics
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(NODE_ACTOR)]
    assert not actors  # stopped and killed


def test_a_node_killed_after_its_worker_pushed_has_the_step_redone_once_on_the_node_left(cluster, tmp_path, monkeypatch, capfd):
    """Worker 1's node is killed while its call of step 4 is in flight, after its push landed and completed the
    step (the worker made to sleep after its push, so its reply is lost), and the run goes on at once, without
    waiting for Ray to declare the node dead. Its replacement, on the node left, redoes the call: it pulls step
    4's parameters and its push is not applied again; every step's loss and the test result equal an undisturbed
    run's."""
    ray_cluster, nodes = cluster
    reference = driver.train(run_config(tmp_path / "a", "s3://episodes/sin"), progress=False)
    spread: list[set[str]] = []
    killed: list[str] = []
    original = RayPool.step_all

    def step_all_killing_a_node(self):
        version = ray.get(self.server.version.remote())
        if version == 1:
            spread.append({node_of(w) for w in self.workers})
        if version != 3 or killed:
            return original(self)
        doomed = node_of(self.workers[1])
        assert doomed != node_of(self.server)  # the server rides with worker 0
        ray.get(self.workers[1].__ray_call__.remote(sleep_after_push()))
        first = self.result(0, self.submit(0))
        lost = self.submit(1)
        wait_until(lambda: ray.get(self.server.version.remote()) == 4, "worker 1's push", 60)
        ray_cluster.remove_node(next(n for n in nodes if n.node_id == doomed), allow_graceful=False)
        killed.append(doomed)
        return [first, self.result(1, lost)]

    monkeypatch.setattr(RayPool, "step_all", step_all_killing_a_node)
    faulty = driver.train(run_config(tmp_path / "b", "s3://episodes/sin"), progress=False)
    assert spread == [{n.node_id for n in nodes}]  # one worker on each worker node
    assert killed and faulty.steps == STEPS
    err = capfd.readouterr().err
    # the error's kind depends on when Ray notices the node's death (ActorDiedError once it is declared dead; a CI
    # run once printed another, elided by pytest): any RayActorError is reported and replaces the worker. Ray's
    # message spans lines, so the report is matched across them.
    assert re.search(r"worker 1 failed \(\w+Error: .*?\); replacing it", err, re.DOTALL), err[-4000:]
    metrics = MlflowClient(f"sqlite:///{tmp_path}/b/mlflow.db").get_run(faulty.run_id).data.metrics
    # Ray may place the first replacement on the dying node before it is declared dead: then a second one
    assert metrics["faults/worker_restarts"] in (1, 2) and "faults/server_restores" not in metrics
    assert metrics["server/duplicate_shares"] == 1  # the redo's push, recognised
    a, b = losses(tmp_path / "a", reference.run_id), losses(tmp_path / "b", faulty.run_id)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert faulty.test == reference.test
