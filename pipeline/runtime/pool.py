"""The parameter server and the workers as the step loop sees them, and their Ray implementation.

``Pool`` is what the loop, the callbacks and the policy's actions need; ``RayPool``
runs the server and the workers as Ray actors, ``pipeline.runtime.local.LocalPool``
in this process. Every result is tagged with the worker that produced it
(StepReport.worker_id). In the Ray pool a worker whose process dies is replaced
(as the failure policy decides) by a new actor that starts at the reader position
of its last finished step, so it recomputes exactly the gradient the dead one was
computing; the server ignores a second push for the same version, so no gradient
is applied twice. A call that fails because the *server* died raises ServerLost:
the loop then restores the server with ``restore``.
"""
from __future__ import annotations

import sys
from typing import Any, Hashable, Protocol, Sequence

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from pipeline.config import OptimizerConfig, RunConfig
from pipeline.errors import TrainingError
from pipeline.runtime.policy import FailurePolicy, GiveUp
from pipeline.runtime.server import ParameterServer, ServerState
from pipeline.runtime.worker import EpisodeWorker, StepReport


Positions = list[dict[str, Any] | None]
"""Every worker's reader position (None: the start of its share), as a checkpoint records them."""


class ServerLost(RuntimeError):
    """The parameter server's actor died (a worker's call to it, or the driver's, failed)."""


def split_batch(meta_batch: int, workers: int) -> list[int]:
    """Episodes per worker per step: the meta-batch spread as evenly as possible."""
    return [meta_batch // workers + (i < meta_batch % workers) for i in range(workers)]


def server_options(config: RunConfig) -> tuple[OptimizerConfig, int, int, str, int]:
    """ParameterServer's arguments after its state: optimizer, total steps, workers, mode, staleness bound."""
    t = config.train
    return config.optimizer, t.steps, t.workers, t.mode, t.max_staleness


class Pool(Protocol):
    """One parameter server and N workers. Server calls raise ServerLost when the server is gone."""

    positions: Positions
    """Every worker's reader position after its last finished step."""
    restarts: int
    """Workers replaced since the pool started."""

    @property
    def size(self) -> int:
        """The number of workers."""
        ...

    def step_all(self) -> list[StepReport]:
        """One synchronous step of every worker, in worker order."""
        ...

    def submit(self, i: int) -> Hashable:
        """Start worker ``i``'s next step; returns a handle for ``wait_any`` and ``result``."""
        ...

    def wait_any(self, pending: Sequence[Hashable]) -> Hashable:
        """The first of ``pending`` (handles from ``submit``) to finish."""
        ...

    def result(self, i: int, handle: Hashable) -> StepReport:
        """Worker ``i``'s report for ``handle``."""
        ...

    def stats(self) -> dict[str, float]:
        """The server's counters (ParameterServer.stats)."""
        ...

    def state(self) -> ServerState:
        """The server's full state, for a checkpoint."""
        ...

    def pull(self) -> tuple[int, np.ndarray]:
        """The server's version and a copy of its flat parameters."""
        ...

    def restore(self, state: ServerState, positions: Positions) -> None:
        """Replace the server by one holding ``state`` and every worker by one starting at ``positions``."""
        ...

    def stop(self) -> None:
        """End the server and the workers."""
        ...


class RayPool:
    """The server as a Ray actor (no CPU of its own) and N EpisodeWorker actors: a GPU each when the cluster has
    GPUs (train.gpus_per_worker), else an equal share of the CPUs."""

    def __init__(
        self,
        config: RunConfig,
        resources: dict[str, float],
        state: ServerState,
        positions: Positions,
        policy: FailurePolicy,
    ) -> None:
        t = config.train
        gpus = resources.get("GPU", 0.0)
        share = max(resources.get("CPU", 1.0), 1.0) / t.workers
        options: dict[str, Any] = {"num_cpus": min(share, 1.0) if gpus else share, "max_restarts": 0}
        if gpus:
            options["num_gpus"] = t.gpus_per_worker
        self._worker_class = ray.remote(EpisodeWorker).options(**options)
        self._server_class = ray.remote(ParameterServer).options(num_cpus=0)
        self._server_args = server_options(config)
        self._raw = config.model_dump(mode="json")
        self._batches = split_batch(t.meta_batch, t.workers)
        self._threads = max(1, int(share))
        self._policy = policy
        self.positions = list(positions)
        self.restarts = 0
        self.server = self._server_class.remote(state, *self._server_args)
        self.workers = [self._start(i) for i in range(t.workers)]

    @property
    def size(self) -> int:
        return len(self._batches)

    def _start(self, i: int) -> Any:
        return self._worker_class.remote(i, self.size, self._raw, self._batches[i], self.positions[i], self._threads)

    def submit(self, i: int) -> ray.ObjectRef:
        return self.workers[i].step.remote(self.server)

    def wait_any(self, pending: Sequence[Hashable]) -> Hashable:
        ready, _ = ray.wait(list(pending), num_returns=1)
        return ready[0]

    def result(self, i: int, handle: Hashable) -> StepReport:
        """Worker ``i``'s report; a dead worker is replaced and its step redone while the policy allows.

        Raises ServerLost when the worker lost the server, TrainingError when the policy gives up.
        """
        deaths = 0
        while True:
            try:
                report: StepReport = ray.get(handle)
                self.positions[i] = report.position
                return report
            except RayActorError as e:
                if isinstance(e, RayTaskError):  # the worker is alive: the actor that died is the server
                    raise ServerLost(f"worker {i} lost the parameter server: {type(e.cause).__name__}") from e
                deaths += 1
                decision = self._policy.worker_died(i, deaths, e)
                if isinstance(decision, GiveUp):
                    raise TrainingError(decision.reason) from None
                print(f"worker {i} died ({type(e).__name__}); replacing it", file=sys.stderr)
                self.restarts += 1
                ray.kill(self.workers[i])
                self.workers[i] = self._start(i)
                handle = self.submit(i)

    def step_all(self) -> list[StepReport]:
        refs = [self.submit(i) for i in range(self.size)]
        return [self.result(i, ref) for i, ref in enumerate(refs)]

    def _server_call(self, method: str) -> Any:
        try:
            return ray.get(getattr(self.server, method).remote())
        except RayActorError as e:
            raise ServerLost(f"the parameter server died ({type(e).__name__})") from e

    def stats(self) -> dict[str, float]:
        return self._server_call("stats")

    def state(self) -> ServerState:
        return self._server_call("state")

    def pull(self) -> tuple[int, np.ndarray]:
        return self._server_call("pull")

    def restore(self, state: ServerState, positions: Positions) -> None:
        self.stop()
        self.positions = list(positions)
        self.server = self._server_class.remote(state, *self._server_args)
        self.workers = [self._start(i) for i in range(self.size)]

    def stop(self) -> None:
        for actor in [self.server, *self.workers]:
            ray.kill(actor)
