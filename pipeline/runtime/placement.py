"""Gang scheduling: the parameter server and the workers placed together by one Ray placement group.

One bundle per worker (its CPUs, its GPU or fraction of one, its custom resources);
the server, which needs no resources of its own, rides in bundle 0 beside worker 0.
``train.placement`` is the group's strategy (PACK: as few nodes as possible; SPREAD:
over the nodes; STRICT_*: or fail). The run waits ``train.placement_timeout_s`` for
the whole group, so a run the cluster cannot hold fails with the missing resources
named instead of waiting forever with half its workers started. When a node dies
Ray places its bundles again on the nodes left, and replacement workers start there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.config import RunConfig
from pipeline.errors import TrainingError


def worker_bundle(config: RunConfig, resources: dict[str, float]) -> dict[str, float]:
    """One worker's resources: ``train.cpus_per_worker`` (default an equal share of the cluster's CPUs, at most
    1 beside a GPU), ``train.gpus_per_worker`` when the cluster has GPUs (a fraction shares one), and
    ``train.resources_per_worker``."""
    t = config.train
    gpus = resources.get("GPU", 0.0) > 0 and t.gpus_per_worker > 0
    share = max(resources.get("CPU", 1.0), 1.0) / t.workers
    bundle = {"CPU": t.cpus_per_worker or (min(share, 1.0) if gpus else share)}
    if gpus:
        bundle["GPU"] = t.gpus_per_worker
    return {**bundle, **t.resources_per_worker}


def shortfall(bundle: dict[str, float], workers: int, strategy: str) -> str:
    """Why ``workers`` bundles like ``bundle`` were not placed: the resources the cluster lacks in total, or,
    when it has them, every live node's resources (they do not fit as ``strategy``, or other jobs hold them)."""
    have = ray.cluster_resources()
    lacking = [
        f"{key} (needs {workers} x {amount:g} = {workers * amount:g}, the cluster has {have.get(key, 0.0):g})"
        for key, amount in sorted(bundle.items())
        if workers * amount > have.get(key, 0.0) + 1e-9
    ]
    if lacking:
        return "missing " + ", ".join(lacking)
    nodes = [
        "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(n["Resources"].items()) if k in bundle) + "}"
        for n in ray.nodes()
        if n["Alive"]
    ]
    return (
        f"the cluster has them in total, but {workers} bundles of {bundle} do not fit its nodes {nodes} as {strategy}"
        " (or other jobs hold them now)"
    )


@dataclass
class Placement:
    """A ready placement group: bundle ``i`` holds worker ``i`` (and bundle 0 the server too)."""

    group: PlacementGroup
    bundle: dict[str, float]

    @staticmethod
    def reserve(config: RunConfig, resources: dict[str, float]) -> Placement:
        """Ask Ray for every worker's bundle at once and wait up to train.placement_timeout_s.

        Raises TrainingError naming what is missing (``shortfall``) when the group is not
        placed in time; nothing stays reserved then.
        """
        t = config.train
        bundle = worker_bundle(config, resources)
        group = placement_group([dict(bundle) for _ in range(t.workers)], strategy=t.placement)
        if not group.wait(timeout_seconds=t.placement_timeout_s):
            remove_placement_group(group)
            raise TrainingError(
                f"train.placement_timeout_s={t.placement_timeout_s:g}: Ray did not place train.workers={t.workers}"
                f" workers of {bundle} each ({t.placement}): {shortfall(bundle, t.workers, t.placement)}"
            )
        return Placement(group, bundle)

    def worker_options(self, i: int) -> dict[str, Any]:
        """``.options`` of worker ``i``'s actor: its bundle's resources, scheduled into bundle ``i``."""
        custom = {k: v for k, v in self.bundle.items() if k not in ("CPU", "GPU")}
        return {
            "num_cpus": self.bundle["CPU"],
            "num_gpus": self.bundle.get("GPU", 0),
            "resources": custom,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i),
        }

    def server_options(self) -> dict[str, Any]:
        """``.options`` of the server's actor: no resources, beside worker 0 in bundle 0."""
        return {"num_cpus": 0, "scheduling_strategy": PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=0)}

    def remove(self) -> None:
        """Give the resources back (the actors in the group end with it)."""
        remove_placement_group(self.group)
