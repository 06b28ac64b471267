"""System metrics of every node: a Ray cluster of two nodes on this machine (ray.cluster_utils), tracked by a real
``mlflow server``."""
from __future__ import annotations

import secrets
import time

import pytest
import ray
from mlflow.tracking import MlflowClient

from pipeline.runtime.system_metrics import NODE_ACTOR, SystemMetrics, node_names
from tests.helpers import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture
def two_nodes(monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # loopback-only test cluster
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        yield worker.node_id
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_the_other_node_logs_under_its_name_and_the_driver_node_under_system(two_nodes, mlflow_server):
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
