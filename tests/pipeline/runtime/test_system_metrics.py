"""System metrics through MLflow's own monitor: the driver's node on a SQLite run, and how nodes are named."""
from __future__ import annotations

import time

from mlflow.tracking import MlflowClient

from pipeline.runtime.system_metrics import SystemMetrics, node_names


def test_nodes_are_named_by_ip_with_the_node_id_where_ips_repeat():
    nodes = [
        {"NodeID": "aaaaaaaa1111", "NodeManagerAddress": "10.0.0.1", "Alive": True},
        {"NodeID": "bbbbbbbb2222", "NodeManagerAddress": "10.0.0.2", "Alive": True},
        {"NodeID": "cccccccc3333", "NodeManagerAddress": "10.0.0.2", "Alive": True},
        {"NodeID": "dddddddd4444", "NodeManagerAddress": "10.0.0.3", "Alive": False},
    ]
    assert node_names(nodes) == {"aaaaaaaa1111": "10.0.0.1", "bbbbbbbb2222": "10.0.0.2-bbbbbbbb", "cccccccc3333": "10.0.0.2-cccccccc"}


def test_the_driver_node_logs_cpu_and_memory_until_stopped(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("system")).info.run_id
    monitors = SystemMetrics(run_id, uri, interval_s=0.2)
    deadline = time.monotonic() + 30
    while "system/cpu_utilization_percentage" not in client.get_run(run_id).data.metrics and time.monotonic() < deadline:
        time.sleep(0.2)
    monitors.stop()
    metrics = client.get_run(run_id).data.metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    assert 0 < metrics["system/system_memory_usage_percentage"] <= 100 and metrics["system/system_memory_usage_megabytes"] > 0
    steps = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert steps == list(range(len(steps)))  # one step per sample
    time.sleep(0.5)
    assert [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")] == steps  # stopped
