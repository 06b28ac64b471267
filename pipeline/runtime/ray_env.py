"""Where Ray runs: the repository root, the workers' environment, joining a cluster or starting a local Ray."""
from __future__ import annotations

import os
from pathlib import Path

import ray
import torch

from pipeline.config import RunConfig
from pipeline.errors import TrainingError

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The project folder: on the workers' PYTHONPATH and uploaded as a Ray job's working_dir."""

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34)}
"""glibc settings for worker processes (set before they start, through Ray's runtime_env): freed
autograd buffers stay in the heap instead of going back to the OS; 1.4x on the CPU stacked path
(bench/throughput.py)."""


def check_gpus(config: RunConfig, gpus: float) -> None:
    """Refuse a run whose workers need more than ``gpus`` GPUs (with no GPU at all, workers use CPUs).

    Raises TrainingError naming train.workers, train.gpus_per_worker and the GPUs there are.
    """
    need = config.train.workers * config.train.gpus_per_worker
    if gpus and need > gpus:
        raise TrainingError(
            f"train.workers x train.gpus_per_worker = {config.train.workers} x {config.train.gpus_per_worker} "
            f"needs {need:g} GPUs, there are {gpus:g}"
        )


def check_store(config: RunConfig, nodes: int) -> None:
    """Refuse a local ``store.path`` on a cluster of ``nodes`` > 1: workers on the other nodes cannot read it.

    Raises TrainingError naming store.path and the node count.
    """
    if nodes > 1 and not config.store.path.startswith("s3://"):
        raise TrainingError(
            f"store.path={config.store.path!r} is local to one node, the Ray cluster has {nodes}: workers on the"
            " others cannot read it; precompute to s3:// (python -m pipeline precompute CONFIG --out s3://BUCKET/PREFIX)"
        )


def start_ray(config: RunConfig) -> dict[str, float]:
    """Connect to $RAY_ADDRESS (a cluster) or start an embedded local Ray; return its resources (CPU, GPU counts).

    An already initialized Ray is used as it is. Raises TrainingError (``check_gpus``)
    before a local Ray starts, or right after joining a cluster (``check_gpus``, ``check_store``).
    """
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        check_gpus(config, torch.cuda.device_count())  # before Ray starts; a cluster is checked once joined
    if not ray.is_initialized():
        env = {"env_vars": {**MALLOC_ENV, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}}
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=env, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, runtime_env=env)
    resources = ray.cluster_resources()
    check_gpus(config, resources.get("GPU", 0.0))
    check_store(config, sum(1 for node in ray.nodes() if node["Alive"]))
    return resources
