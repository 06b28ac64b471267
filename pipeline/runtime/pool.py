"""The parameter server and the workers as the step loop sees them, and their Ray implementation.

``Pool`` is what the loop, the callbacks and the policy's actions need; ``RayPool``
runs the server and the workers as Ray actors, ``pipeline.runtime.local.LocalPool``
in this process. Every result is tagged with the worker that produced it
(StepReport.worker_id). In the Ray pool a worker whose process dies is replaced
(as the failure policy decides) by a new actor that starts at the reader position
of its last finished step and redoes the lost call with its share number (each
worker slot's step calls are numbered), so it recomputes exactly the gradient the
dead one was computing, at the parameters that one had; the server applies a share
once, also when the lost call's push landed (its reply lost, e.g. a node that died
after the push) or arrives late (ParameterServer.push). The same holds across a
checkpoint: the pool's state for one (``checkpoint_state``) keeps the server's record of
the shares whose push landed but whose report the pool has not taken, and a pool
started from it redoes those with their numbers (``share_counters``). A sync step's
reports count (positions advance) only when every worker's has come, so a checkpoint
never holds half a step. A worker that answers no
call within ``train.call_timeout_s`` is taken for hung, named, killed and replaced
the same way. A call that fails because the *server* died raises ServerLost: the
loop then restores the server with ``restore``.

Evaluation runs on the workers too (``evaluate``): each gets a consecutive slice of
the validation or test episodes (and the one state every episode adapts from, for a
learner that evaluates from a carry: evaluation.meta_test_state), scores it batched on its
device and returns the per-episode scores; the pool only aggregates them (pipeline.evaluation.aggregate).
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Hashable, Protocol, Sequence

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from pipeline.config import OptimizerConfig, RunConfig
from pipeline.errors import TrainingError
from pipeline.evaluation import EvalResult, aggregate
from pipeline.runtime.placement import Placement
from pipeline.runtime.policy import FailurePolicy, GiveUp
from pipeline.runtime.server import ParameterServer, ServerState
from pipeline.runtime.worker import EpisodeWorker, StepReport
from pipeline.types import Carry

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Positions = list[dict[str, Any] | None]
"""Every worker's reader position (None: the start of its share), as a checkpoint records them."""


class ServerLost(RuntimeError):
    """The parameter server's actor died (a worker's call to it, or the driver's, failed)."""


class WorkerHung(RuntimeError):
    """A worker answered no call within train.call_timeout_s (its process may still be alive)."""


def split_batch(meta_batch: int, workers: int) -> list[int]:
    """Episodes per worker per step: the meta-batch spread as evenly as possible."""
    return [meta_batch // workers + (i < meta_batch % workers) for i in range(workers)]


def eval_slices(episodes: int, workers: int) -> list[tuple[int, int]]:
    """Each worker's consecutive ``(start, stop)`` of ``episodes`` evaluation episodes, in worker order, spread as
    evenly as possible (``split_batch``); a worker left with none gets ``(n, n)``."""
    stops = np.cumsum(split_batch(episodes, workers)).tolist()
    return list(zip([0, *stops[:-1]], stops))


def checkpoint_state(state: ServerState, finished: Sequence[int]) -> ServerState:
    """The server's ``state`` as a checkpoint holds it beside the pool's positions: of its record, only the shares
    of slot ``i`` numbered above ``finished[i]`` (the share whose report the pool took last, the one its position
    is after): their push landed, their report did not come; the parameters before the last update only when
    one of those was computed at them."""
    received = {w: r for w, r in state.received.items() if r.share > finished[w]}
    before = state.before if state.before and any(r.version == state.before[0] for r in received.values()) else None
    return dataclasses.replace(state, received=received, before=before)


def ended_version(state: ServerState) -> int:
    """The last step the driver ended (its callbacks ran) when a checkpoint held ``state`` (``checkpoint_state``):
    the server's version less the updates applied by shares whose reports never reached the driver. A resumed
    loop starts there, so the redo of such a share ends its step (validation, checkpoint, metrics) again."""
    return state.version - sum(r.result.applied for r in state.received.values())


def share_counters(state: ServerState, workers: int) -> list[int]:
    """Each worker slot's share counter for a pool starting from ``state`` (its next call takes the number above):
    one below the share of the slot the server's record holds (``checkpoint_state``: the call to redo), else 0."""
    return [state.received[i].share - 1 if i in state.received else 0 for i in range(workers)]


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
        """One synchronous step of every worker, in worker order; positions advance once every report has come."""
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

    def evaluate(self, split: str, episodes: int, flat: np.ndarray, state: Carry | None = None) -> EvalResult:
        """The first ``episodes`` of the store's ``split`` scored under the flat parameters ``flat`` by the workers
        (``eval_slices``), each episode adapted from ``state`` (evaluation.meta_test_state's; None: fresh), aggregated
        in worker order."""
        ...

    def figures(self, flat: np.ndarray, state: Carry | None = None) -> dict[str, Figure]:
        """The learner's own figures under ``flat`` (adapting from ``state``), drawn by worker 0 (EpisodeWorker.figures)."""
        ...

    def stats(self) -> dict[str, float]:
        """The server's counters (ParameterServer.stats)."""
        ...

    def state(self) -> ServerState:
        """The server's state for a checkpoint beside ``positions`` (``checkpoint_state``)."""
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
    """The server and N EpisodeWorker actors in one placement group (``Placement``): the server beside worker 0,
    each worker in its own bundle (a GPU or a fraction of one when the cluster has GPUs, else a CPU share)."""

    def __init__(
        self,
        config: RunConfig,
        placement: Placement,
        state: ServerState,
        positions: Positions,
        policy: FailurePolicy,
    ) -> None:
        t = config.train
        self._placement = placement
        self._worker_class = ray.remote(EpisodeWorker)
        self._server_class = ray.remote(ParameterServer).options(**placement.server_options())
        self._server_args = server_options(config)
        self._raw = config.model_dump(mode="json")
        self._batches = split_batch(t.meta_batch, t.workers)
        self._threads = max(1, int(placement.bundle["CPU"]))
        self._timeout = t.call_timeout_s
        self._deadlines: dict[Hashable, float] = {}
        self._policy = policy
        self.positions = list(positions)
        self._shares = share_counters(state, t.workers)  # each worker slot's number for its current step call
        self._finished = list(self._shares)  # each slot's share whose report the pool took last
        self.restarts = 0
        self.server = self._server_class.remote(state, *self._server_args)
        self.workers = [self._start(i) for i in range(t.workers)]

    @property
    def size(self) -> int:
        return len(self._batches)

    def _start(self, i: int) -> Any:
        actor = self._worker_class.options(max_restarts=0, **self._placement.worker_options(i))
        return actor.remote(i, self.size, self._raw, self._batches[i], self.positions[i], self._threads)

    def _call(self, ref: ray.ObjectRef) -> ray.ObjectRef:
        """Track a worker call's deadline (train.call_timeout_s from now)."""
        self._deadlines[ref] = time.monotonic() + self._timeout
        return ref

    def submit(self, i: int) -> ray.ObjectRef:
        self._shares[i] += 1
        return self._step(i)

    def _step(self, i: int) -> ray.ObjectRef:
        """Worker ``i``'s step call for its current share number (a redo passes the lost call's)."""
        return self._call(self.workers[i].step.remote(self.server, self._shares[i]))

    def wait_any(self, pending: Sequence[Hashable]) -> Hashable:
        """The first of ``pending`` to finish, or, when none does before the earliest deadline, that overdue one
        (``result`` then finds it hung)."""
        pending = list(pending)
        first = min(pending, key=lambda ref: self._deadlines[ref])
        ready, _ = ray.wait(pending, num_returns=1, timeout=max(self._deadlines[first] - time.monotonic(), 0.0))
        return ready[0] if ready else first

    def result(self, i: int, handle: Hashable) -> StepReport:
        """Worker ``i``'s report; a dead or hung worker is replaced and its step redone while the policy allows.

        Raises ServerLost when the worker lost the server, TrainingError when the policy gives up.
        """
        return self._finish(i, self._report(i, handle))

    def _report(self, i: int, handle: Hashable) -> StepReport:
        """Worker ``i``'s report for ``handle``, the worker replaced while it dies or hangs (``_get``)."""
        return self._get(i, handle, lambda: self._step(i))

    def _finish(self, i: int, report: StepReport) -> StepReport:
        """Take worker ``i``'s report of its current share: its position advances."""
        self.positions[i], self._finished[i] = report.position, self._shares[i]
        return report

    def _get(self, i: int, handle: Hashable, again: Callable[[], ray.ObjectRef]) -> Any:
        """The value of worker ``i``'s call ``handle``; when the worker died or hung, replace it and ``again()``."""
        failures = 0
        while True:
            try:
                return ray.get(handle, timeout=max(self._deadlines.pop(handle) - time.monotonic(), 0.0))
            except GetTimeoutError:
                error: BaseException = WorkerHung(f"worker {i} answered nothing in train.call_timeout_s={self._timeout:g}")
            except RayActorError as e:
                if isinstance(e, RayTaskError):  # the worker is alive: the actor that died is the server
                    raise ServerLost(f"worker {i} lost the parameter server: {type(e.cause).__name__}") from e
                error = e
            failures += 1
            decision = self._policy.worker_died(i, failures, error)
            if isinstance(decision, GiveUp):
                raise TrainingError(decision.reason) from None
            print(f"worker {i} failed ({type(error).__name__}: {error}); replacing it", file=sys.stderr)
            self.restarts += 1
            ray.kill(self.workers[i])
            self.workers[i] = self._start(i)
            handle = again()

    def step_all(self) -> list[StepReport]:
        refs = [self.submit(i) for i in range(self.size)]
        reports = [self._report(i, ref) for i, ref in enumerate(refs)]
        return [self._finish(i, report) for i, report in enumerate(reports)]

    def evaluate(self, split: str, episodes: int, flat: np.ndarray, state: Carry | None = None) -> EvalResult:
        shared, shared_state = ray.put(flat), ray.put(state)  # one copy in the object store for every worker
        calls = {
            i: (lambda i=i, start=start, stop=stop: self._call(self.workers[i].evaluate.remote(split, start, stop, shared, shared_state)))
            for i, (start, stop) in enumerate(eval_slices(episodes, self.size))
            if stop > start
        }
        handles = {i: call() for i, call in calls.items()}
        return aggregate([self._get(i, handles[i], calls[i]) for i in calls])

    def figures(self, flat: np.ndarray, state: Carry | None = None) -> dict[str, Figure]:
        def again() -> ray.ObjectRef:
            return self._call(self.workers[0].figures.remote(flat, state))

        # arrays out of Ray's object store are read-only, and matplotlib writes to its own when saving: copy
        return {name: copy.deepcopy(figure) for name, figure in self._get(0, again(), again).items()}

    def _server_call(self, method: str) -> Any:
        try:
            return ray.get(getattr(self.server, method).remote())
        except RayActorError as e:
            raise ServerLost(f"the parameter server died ({type(e).__name__})") from e

    def stats(self) -> dict[str, float]:
        return self._server_call("stats")

    def state(self) -> ServerState:
        return checkpoint_state(self._server_call("state"), self._finished)

    def pull(self) -> tuple[int, np.ndarray]:
        return self._server_call("pull")

    def restore(self, state: ServerState, positions: Positions) -> None:
        self.stop()
        self.positions = list(positions)
        self._shares = share_counters(state, self.size)
        self._finished = list(self._shares)
        self.server = self._server_class.remote(state, *self._server_args)
        self.workers = [self._start(i) for i in range(self.size)]

    def stop(self) -> None:
        for actor in [self.server, *self.workers]:
            ray.kill(actor)
        self._deadlines.clear()
