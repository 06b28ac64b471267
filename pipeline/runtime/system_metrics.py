"""System metrics of a run's nodes in MLflow ("System metrics" in the run's page), by MLflow's own monitor.

MLflow's ``SystemMetricsMonitor`` samples CPU utilization, system memory, disk and
network, and each GPU's utilization and memory where NVML finds one (nvidia-ml-py),
every ``tracking.system_metrics_s`` seconds, and logs them as ``system/<metric>``
(step = sample count) until the run ends. The driver's node logs under
``system/``; on a Ray cluster of several nodes, each other node gets a small actor
(no CPU reserved) pinned to it that logs under ``system/<node>/`` (``node_names``),
when the run is tracked by an MLflow server (a SQLite store is a file on the driver's
node). Nodes that join after the run started are not watched.
"""
from __future__ import annotations

import sys
from typing import Any

NODE_ACTOR = "metapipe-system-metrics"
"""Name prefix of the per-node monitor actors."""


def node_names(nodes: list[dict[str, Any]]) -> dict[str, str]:
    """Each alive node's id -> the name its metrics go under: its IP address, plus the first 8 characters of its
    node id when several nodes share that IP (a cluster simulated on one machine). ``nodes``: ``ray.nodes()``."""
    alive = [n for n in nodes if n.get("Alive")]
    ips = [n["NodeManagerAddress"] for n in alive]
    return {
        n["NodeID"]: n["NodeManagerAddress"] if ips.count(n["NodeManagerAddress"]) == 1 else f"{n['NodeManagerAddress']}-{n['NodeID'][:8]}"
        for n in alive
    }


class NodeMonitor:
    """MLflow's system-metrics monitor for one run on one node, under ``system/<node>/``; a Ray actor."""

    def __init__(self, run_id: str, uri: str, node: str | None, interval_s: float, resume: bool) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(
            run_id, sampling_interval=interval_s, node_id=node, tracking_uri=uri, resume_logging=resume
        )
        self._monitor.start()

    def stop(self) -> None:
        """Stop sampling and deliver what was sampled."""
        self._monitor.finish()


class SystemMetrics:
    """Monitors of the driver's node and, on a multi-node Ray cluster tracked by a server, of every other node.

    ``interval_s``: seconds between samples; ``resume``: continue a resumed run's
    ``system/`` steps. ``stop`` ends them all (best effort: a node that died is skipped).
    """

    def __init__(self, run_id: str, uri: str, interval_s: float, resume: bool = False) -> None:
        self._driver = NodeMonitor(run_id, uri, None, interval_s, resume)
        self._nodes: list[tuple[str, Any]] = []
        if uri.startswith("sqlite:"):
            return
        import ray

        if not ray.is_initialized():
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        actor = ray.remote(NodeMonitor)
        for node_id, name in node_names(ray.nodes()).items():
            if node_id != here:
                strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
                options = {"num_cpus": 0, "scheduling_strategy": strategy, "name": f"{NODE_ACTOR}-{run_id[:8]}-{name}"}
                self._nodes.append((name, actor.options(**options).remote(run_id, uri, name, interval_s, resume)))

    def stop(self) -> None:
        """Stop every monitor after delivering its last samples."""
        self._driver.stop()
        if self._nodes:
            import ray

            for name, node in self._nodes:
                try:
                    ray.get(node.stop.remote(), timeout=60)
                except Exception as e:  # noqa: BLE001 - a node lost during the run: the run's own outcome stands
                    print(f"system metrics of node {name}: last samples not delivered ({type(e).__name__})", file=sys.stderr)
                ray.kill(node)
