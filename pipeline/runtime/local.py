"""The pool in this process: the same ParameterServer and EpisodeWorker classes the Ray actors wrap, no Ray.

A step runs when its result is asked for, one worker after another, so a sync
step gives the same gradients, the same average and the same update as on Ray; in
async mode each worker pulls the parameters its predecessor just updated
(staleness 0), and every version is a step of its own.
Evaluation is split over the workers exactly as on Ray (``eval_slices``), so the
numbers are the same. Nothing here dies or hangs on its own, so no failure is handled.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING, Hashable, Sequence

import numpy as np

from pipeline.config import RunConfig
from pipeline.evaluation import EvalResult, aggregate
from pipeline.runtime.pool import Positions, eval_slices, server_options, split_batch
from pipeline.runtime.server import ParameterServer, ServerState
from pipeline.runtime.worker import EpisodeWorker, StepReport

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class LocalPool:
    """A ``pipeline.runtime.pool.Pool`` of one in-process server and ``train.workers`` in-process workers."""

    def __init__(self, config: RunConfig, state: ServerState, positions: Positions) -> None:
        self._config = config
        self._raw = config.model_dump(mode="json")
        self._batches = split_batch(config.train.meta_batch, config.train.workers)
        self._handles = itertools.count()
        self.restarts = 0
        self.workers: list[EpisodeWorker] = []
        self.restore(state, positions)

    @property
    def size(self) -> int:
        return len(self._batches)

    def step_all(self) -> list[StepReport]:
        return [self.result(i, self.submit(i)) for i in range(self.size)]

    def submit(self, i: int) -> Hashable:
        return next(self._handles)

    def wait_any(self, pending: Sequence[Hashable]) -> Hashable:
        return min(pending)  # the first submitted

    def result(self, i: int, handle: Hashable) -> StepReport:
        report = self.workers[i].step(self.server, handle)  # the handles, numbered in order, number the shares
        self.positions[i] = report.position
        return report

    def evaluate(self, split: str, episodes: int, flat: np.ndarray) -> EvalResult:
        slices = enumerate(eval_slices(episodes, self.size))
        return aggregate([self.workers[i].evaluate(split, start, stop, flat) for i, (start, stop) in slices if stop > start])

    def figures(self, flat: np.ndarray) -> dict[str, Figure]:
        return self.workers[0].figures(flat)

    def stats(self) -> dict[str, float]:
        return self.server.stats()

    def state(self) -> ServerState:
        return self.server.state()

    def pull(self) -> tuple[int, np.ndarray]:
        return self.server.pull()

    def restore(self, state: ServerState, positions: Positions) -> None:
        self.stop()
        # The server updates its state object in place; the caller's (a restore point) must stay as it is.
        own = dataclasses.replace(state, pending=dict(state.pending))
        self.server = ParameterServer(own, *server_options(self._config))
        self.positions = list(positions)
        self.workers = [EpisodeWorker(i, self.size, self._raw, self._batches[i], self.positions[i]) for i in range(self.size)]

    def stop(self) -> None:
        for worker in self.workers:
            worker.close()
        self.workers = []
