"""The driver's one place to reach the workers: starts them, knows their health, replaces dead ones.

Every result is tagged with the worker that produced it (StepReport.worker_id). A
worker whose process dies is replaced by a new actor that starts at the reader
position of its last finished step, so it recomputes exactly the gradient the
dead one was computing; the server ignores a second push for the same version,
so no gradient is applied twice. A step that fails because the *server* died
(the worker is alive; its call to the server failed) raises ServerLost: the driver
restores the server and calls ``restart`` with the positions of its checkpoint.
"""
from __future__ import annotations

import sys
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from pipeline.config import RunConfig
from pipeline.runtime.worker import EpisodeWorker, StepReport

MAX_RESTARTS_PER_STEP = 3


class WorkerLost(RuntimeError):
    """A worker kept dying: the message names it and how often it was replaced."""


class ServerLost(RuntimeError):
    """A worker's call to the parameter server failed because the server's actor died."""


def split_batch(meta_batch: int, workers: int) -> list[int]:
    """Episodes per worker per step: the meta-batch spread as evenly as possible."""
    return [meta_batch // workers + (i < meta_batch % workers) for i in range(workers)]


class WorkerPool:
    """N EpisodeWorker actors: a GPU each when the cluster has GPUs, else an equal CPU share."""

    def __init__(self, config: RunConfig, resources: dict[str, float], positions: list[dict | None]) -> None:
        n = config.train.workers
        gpus = resources.get("GPU", 0.0)
        share = max(resources.get("CPU", 1.0), 1.0) / n
        options: dict[str, Any] = {"num_cpus": min(share, 1.0) if gpus else share, "max_restarts": 0}
        if gpus:
            options["num_gpus"] = config.train.gpus_per_worker
        self._actor = ray.remote(EpisodeWorker).options(**options)
        self._args = (n, config.model_dump(mode="json"))
        self._batches = split_batch(config.train.meta_batch, n)
        self._threads = max(1, int(share))
        self.positions = list(positions)
        self.restarts = 0
        self.actors = [self._start(i) for i in range(n)]

    def _start(self, i: int) -> Any:
        n, raw = self._args
        return self._actor.remote(i, n, raw, self._batches[i], self.positions[i], self._threads)

    def submit(self, i: int, server: Any) -> ray.ObjectRef:
        """Start worker ``i``'s next step against ``server``."""
        return self.actors[i].step.remote(server)

    def result(self, i: int, ref: ray.ObjectRef, server: Any) -> StepReport:
        """Worker ``i``'s report for ``ref``; a dead worker is replaced and its step redone."""
        for attempt in range(MAX_RESTARTS_PER_STEP + 1):
            try:
                report: StepReport = ray.get(ref)
                self.positions[i] = report.position
                return report
            except RayActorError as e:
                if isinstance(e, RayTaskError):  # the worker is alive: the actor that died is the server
                    raise ServerLost(f"worker {i} lost the parameter server: {type(e.cause).__name__}") from e
                if attempt == MAX_RESTARTS_PER_STEP:
                    raise WorkerLost(f"worker {i} died {attempt + 1} times in one step: {e}") from None
                print(f"worker {i} died ({type(e).__name__}); replacing it", file=sys.stderr)
                self.restarts += 1
                ray.kill(self.actors[i])
                self.actors[i] = self._start(i)
                ref = self.submit(i, server)
        raise AssertionError("unreachable")

    def step_all(self, server: Any) -> list[StepReport]:
        """One synchronous step of every worker."""
        refs = [self.submit(i, server) for i in range(len(self.actors))]
        return [self.result(i, ref, server) for i, ref in enumerate(refs)]

    def restart(self, positions: list[dict | None]) -> None:
        """Replace every worker by a new one starting at ``positions`` (after a server restore)."""
        self.stop()
        self.positions = list(positions)
        self.actors = [self._start(i) for i in range(len(self.actors))]

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors])

    def stop(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
