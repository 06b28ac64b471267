"""The pool in this process: the same ParameterServer and EpisodeWorker classes the Ray actors wrap, no Ray.

A step runs when its result is asked for, one worker after another, so a sync
step gives the same gradients, the same average and the same update as on Ray; in
async mode each worker pulls the parameters its predecessor just updated
(staleness 0), and every version is a step of its own. Shares are numbered per
worker slot and checkpointed as on Ray (``checkpoint_state``, ``share_counters``).
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
from pipeline.runtime.pool import (
    Positions,
    checkpoint_state,
    eval_slices,
    server_options,
    share_counters,
    split_batch,
)
from pipeline.runtime.server import ParameterServer, ServerState
from pipeline.runtime.worker import EpisodeWorker, StepReport
from pipeline.types import Carry

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
        reports = [self._report(i, self.submit(i)) for i in range(self.size)]
        return [self._finish(i, report) for i, report in enumerate(reports)]

    def submit(self, i: int) -> Hashable:
        self._shares[i] += 1
        return next(self._handles)

    def wait_any(self, pending: Sequence[Hashable]) -> Hashable:
        return min(pending)  # the first submitted

    def result(self, i: int, handle: Hashable) -> StepReport:
        return self._finish(i, self._report(i, handle))

    def _report(self, i: int, handle: Hashable) -> StepReport:
        """Worker ``i``'s step, run now, for its current share number (the handle only orders calls: ``wait_any``)."""
        return self.workers[i].step(self.server, self._shares[i])

    def _finish(self, i: int, report: StepReport) -> StepReport:
        """Take worker ``i``'s report of its current share: its position advances."""
        self.positions[i], self._finished[i] = report.position, self._shares[i]
        return report

    def evaluate(self, split: str, episodes: int, flat: np.ndarray, state: Carry | None = None) -> EvalResult:
        slices = enumerate(eval_slices(episodes, self.size))
        return aggregate([self.workers[i].evaluate(split, start, stop, flat, state) for i, (start, stop) in slices if stop > start])

    def figures(self, flat: np.ndarray, state: Carry | None = None) -> dict[str, Figure]:
        return self.workers[0].figures(flat, state)

    def stats(self) -> dict[str, float]:
        return self.server.stats()

    def state(self) -> ServerState:
        return checkpoint_state(self.server.state(), self._finished)

    def pull(self) -> tuple[int, np.ndarray]:
        return self.server.pull()

    def restore(self, state: ServerState, positions: Positions) -> None:
        self.stop()
        # The server updates its state object in place; the caller's (a restore point) must stay as it is.
        own = dataclasses.replace(state, pending=dict(state.pending), received=dict(state.received))
        self.server = ParameterServer(own, *server_options(self._config))
        self.positions = list(positions)
        self._shares = share_counters(state, self.size)  # each worker slot's number for its current step call
        self._finished = list(self._shares)  # each slot's share whose report the pool took last
        self.workers = [EpisodeWorker(i, self.size, self._raw, self._batches[i], self.positions[i]) for i in range(self.size)]

    def stop(self) -> None:
        for worker in self.workers:
            worker.close()
        self.workers = []
